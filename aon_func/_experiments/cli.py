"""``aon-func compare``, ``train``, ``approx`` and ``report``: the comparison experiments.

``compare`` trains the same model with each method (``--methods``) for
``--seeds`` seeds and writes ``results.json``, ``results.csv``,
``results.md`` and the plots (:data:`.report.PLOTS`: ``accuracy.png``,
``spectra.png``, ``speed_accuracy.png``, ``training.png``,
``conditioning.png``) into ``--out``; ``train`` does the same for one method.
Every run is checkpointed after every epoch in ``--out/runs/``; ``--resume``
continues them. ``report DIR`` renders the tables and plots of a folder's
``results.json`` again, into a new folder (``DIR/report/`` by default),
leaving ``DIR`` as it was.

Protocol: each seed's validation split is carved from the training set
(``--val-fraction``; ``--train-size`` subsamples the training set first);
the per-epoch numbers are validation numbers and the test set is read once
per run, at its end. With ``--tune`` each method is first trained with every
configuration of its grid (:mod:`.protocol`) on ``--tune-seeds`` seeds
(0..T-1), the configuration of the best mean validation accuracy is kept,
and it is trained on the ``--seeds`` evaluation seeds (T..T+N-1), whose test
accuracies are reported. Without ``--tune`` the options' one configuration
is run on seeds 0..N-1. ``compare`` then tests every method against
``plain`` and the best regulariser by validation (:mod:`.stats`).

``--out`` is never overwritten: without ``--resume``, a folder that already
holds results (``results.json``, ``config.json`` or ``runs/``) is left alone
and the new results go beside it, into the first free ``OUT-2``, ``OUT-3``...
(the command says so). With ``--resume`` the given folder is continued, with
the options and the number of epochs it was started with (its
``config.json``; more methods and seeds are fine, anything else is refused
before a file is written); ``--extend`` trains it on to a larger
``--epochs`` and first moves its results into ``OUT/epochs-N/``.

Everything that can be checked without data (options, ``--out``, the model
against the data set's shape, ``--resume`` against the folder) is checked
before any data is generated or read. This module imports only torch and
aon_func; the experiments extra (numpy, tqdm, matplotlib, scikit-learn,
mnist1d) is imported when a command runs, after checking that it is
installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import DEFAULT_ORDER
from .methods import METHOD_NAMES, Method, Scale, parse_method, parse_methods
from .models import ACTIVATIONS, DATASET_SHAPES, DEEP_MODELS, MODELS, build_model, default_model
from .protocol import DEFAULT_TUNE

__all__ = ["DEFAULT_METHODS", "QUICK_EPOCHS", "QUICK_SEEDS", "register"]

DEFAULT_METHODS = "plain,sn,soft,srip,oni,polar,aon-1,aon-2,aon-4"
"""``compare``'s default methods (``aon`` is ``aon-{DEFAULT_ORDER}``)."""

QUICK_EPOCHS = 30
"""``compare``'s default epochs: the quick budget (README's main-job command)."""

QUICK_SEEDS = 2
"""``compare``'s default number of seeds."""

DEFAULT_NORMALISE_HEAD = False
DEFAULT_GAIN = "learnable"
DEFAULT_GAIN_INIT = math.sqrt(2.0)
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TUNE_SEEDS = 3

_ARTEFACTS = ("results.json", "config.json", "runs")

_RESULT_FILES = (
    "results.json",
    "results.csv",
    "results.md",
    "accuracy.png",
    "spectra.png",
    "speed_accuracy.png",
    "training.png",
    "conditioning.png",
)

STUDY_POINTER = (
    "the study of the paper's claim (tuned on validation, 10 seeds, paired statistics, deep "
    "plain networks): docs/results.md in the aon_func repository"
)
"""What ``compare`` prints after its verdict: where the credible test is."""

EXTRA = "experiments"
"""The extra that ``compare`` and ``train`` need: ``pip install "aon-func[experiments]"``."""

EXTRA_MODULES = {
    "numpy": "numpy",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "mnist1d": "mnist1d",
}
"""The modules of the experiments extra (import name: distribution name)."""

MIN_BAR_COLUMNS = 40
"""A terminal narrower than this (or reporting 0 columns) gets one line per run, not a bar."""


class UsageError(Exception):
    """A bad combination of options; one line for the user."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    values = []
    for part in (t.strip() for t in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive numbers, got {part!r}"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive numbers, got {part!r}"
            )
        values.append(value)
    return tuple(values)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated orders >= 0, got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated orders >= 0, got {text!r}")
    return values


def _scales(text: str) -> tuple[tuple[bool, str], ...]:
    out = []
    for part in (t.strip() for t in text.split(",")):
        head, _, gain = part.partition(":")
        if head not in ("free", "head") or not gain:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated HEAD:GAIN with HEAD free or head, got {part!r}"
            )
        out.append((head == "head", _gain(gain)))
    return tuple(out)


def _gain(text: str) -> str:
    if text in ("none", "learnable"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'none', 'learnable' or a positive number, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a fixed gain must be positive, got {text!r}")
    return repr(value)


def _methods(text: str) -> list[Method]:
    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method(text: str) -> Method:
    try:
        return parse_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset", choices=tuple(DATASET_SHAPES), default="mnist1d", help="default: mnist1d"
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="local copy of mnist (idx files) or cifar10 (python batches)",
    )
    g.add_argument(
        "--model",
        choices=MODELS,
        help="default: mlp for mnist1d and digits, cnn for mnist, resnet for cifar10",
    )
    g.add_argument(
        "--depth",
        type=_positive_int,
        default=20,
        help=f"weight layers of {' and '.join(DEEP_MODELS)}, the classifier included (default: 20)",
    )
    g.add_argument(
        "--width",
        type=_positive_int,
        help="units (deep-mlp, default 100) or channels (deep-cnn, default 16)",
    )
    g.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="of the deep models (default: relu)",
    )
    g.add_argument(
        "--train-size",
        type=_positive_int,
        metavar="N",
        help="train on a fixed subset of N training examples (validation included; default: all)",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        default=DEFAULT_VAL_FRACTION,
        metavar="F",
        help="share of the training set held out for validation, per seed "
        f"(default: {DEFAULT_VAL_FRACTION})",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=QUICK_EPOCHS,
        help=f"default: {QUICK_EPOCHS} (the quick budget)",
    )
    g.add_argument(
        "--seeds",
        type=_positive_int,
        default=QUICK_SEEDS,
        help=f"number of seeds, 0..N-1 (default: {QUICK_SEEDS})",
    )
    g.add_argument("--batch-size", type=_positive_int, default=100, help="default: 100")
    g.add_argument(
        "--lr", type=_positive_float, default=1e-2, help="Adam learning rate (default: 0.01)"
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads of torch (default: 1; 2 were no faster on these small models)",
    )
    g = p.add_argument_group("which layers, which gain (the same for every method)")
    g.add_argument(
        "--normalise-head",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_NORMALISE_HEAD,
        help="also normalise/penalise the classifier layer "
        f"(default: {'yes' if DEFAULT_NORMALISE_HEAD else 'no'})",
    )
    g.add_argument(
        "--gain",
        type=_gain,
        default=DEFAULT_GAIN,
        help=f"gain of each normalised layer: none, learnable or a number (default: {DEFAULT_GAIN})",
    )
    g.add_argument(
        "--gain-init",
        type=_positive_float,
        default=DEFAULT_GAIN_INIT,
        help="initial value of a learnable gain (default: sqrt(2))",
    )
    g = p.add_argument_group(
        "tuning on validation (--tune: every method gets the same grid; the options above "
        "it replaces are --lr, --normalise-head/--gain and an unnumbered method's order or weight)"
    )
    g.add_argument(
        "--tune",
        action="store_true",
        help="select each method's configuration on validation over --tune-seeds seeds, "
        "then report --seeds further seeds",
    )
    g.add_argument(
        "--tune-seeds",
        type=_positive_int,
        default=DEFAULT_TUNE_SEEDS,
        help=f"seeds 0..T-1 for the selection (default: {DEFAULT_TUNE_SEEDS})",
    )
    g.add_argument(
        "--tune-lrs",
        type=_float_list,
        default=DEFAULT_TUNE.lrs,
        metavar="LIST",
        help="learning rates (default: 0.003,0.01,0.03)",
    )
    g.add_argument(
        "--tune-lambdas",
        type=_float_list,
        default=DEFAULT_TUNE.lambdas,
        metavar="LIST",
        help="penalty weights of soft and srip (default: 1e-4,1e-3,1e-2)",
    )
    g.add_argument(
        "--tune-decays",
        type=_float_list,
        default=DEFAULT_TUNE.decays,
        metavar="LIST",
        help="decoupled weight decays of wd (default: 0.01,0.1,1)",
    )
    g.add_argument(
        "--tune-orders",
        type=_int_list,
        default=DEFAULT_TUNE.orders,
        metavar="LIST",
        help="AON orders of aon and aon-fro (default: 1,2,4)",
    )
    g.add_argument(
        "--tune-scales",
        type=_scales,
        default=DEFAULT_TUNE.scales,
        metavar="LIST",
        help="head/gain policies of the normalising methods, HEAD:GAIN with HEAD free "
        "(classifier left alone) or head (normalised) (default: free:learnable,head:learnable)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", metavar="DIR", type=Path, help="results folder (default: runs/<command>)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs checkpointed in --out, to the epochs it was started with",
    )
    g.add_argument(
        "--extend",
        action="store_true",
        help="with --resume and a larger --epochs: train the runs on to --epochs "
        "(the folder's results move into OUT/epochs-N/ first)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress output; only the final table")


def register(sub: Any) -> None:
    """Add ``compare``, ``train``, ``approx`` and ``report`` to the ``aon-func`` sub-command
    parsers ``sub``."""
    compare = sub.add_parser(
        "compare",
        help="train one model with each method and print a results table",
        description=(
            "Train the same model with each method (same init, data order and optimiser) "
            "and report test accuracy, training loss, orthogonality error and time per epoch. "
            f"The defaults are the quick budget (MNIST-1D MLP, {QUICK_EPOCHS} epochs, "
            f"{QUICK_SEEDS} seeds); see docs/results.md for the full comparison."
        ),
    )
    compare.add_argument(
        "--methods",
        type=_methods,
        default=parse_methods(DEFAULT_METHODS),
        metavar="LIST",
        help=f"comma-separated (default: {DEFAULT_METHODS}); the names: {METHOD_NAMES} "
        f"(aon is aon-{DEFAULT_ORDER})",
    )
    _common(compare)
    compare.set_defaults(func=_run_compare, command="compare")

    train = sub.add_parser(
        "train",
        help="train one model with one method",
        description="Train one model with one method; same options and outputs as compare.",
    )
    train.add_argument(
        "--method",
        type=_method,
        required=True,
        metavar="NAME",
        help=f"one of {METHOD_NAMES}",
    )
    _common(train)
    train.set_defaults(func=_run_train, command="train")

    approx = sub.add_parser(
        "approx",
        help="AON's actual and certified errors against K on a results folder's trained layers",
        description=(
            "For the first reported run of each AON method (aon, aon-K) in a compare/train "
            "results folder: ||h h^T - I||_2, ||h - U V^T||_2 and aon_func.certified_error "
            "for each order K, on the trained raw weights of its normalised layers."
        ),
    )
    approx.add_argument("folder", type=Path, metavar="DIR", help="a compare or train --out folder")
    approx.add_argument(
        "--max-order", type=int, default=16, metavar="K", help="orders 0..K (default: 16)"
    )
    approx.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the numbers to FILE (a new file)"
    )
    approx.set_defaults(func=_run_approx, command="approx")

    jac = sub.add_parser(
        "jacobian",
        help="singular values of the input-output Jacobian at init and trained, per method",
        description=(
            "For the first reported run of each method of a compare/train results folder: the "
            "singular values of d logits / d input (and, for deep-mlp, of the deep hidden stack "
            "d h_{L-1} / d h_1) of the network the method uses, at its initialisation (rebuilt "
            "from the run's seed) and after training (its checkpoint), on a few fixed inputs."
        ),
    )
    jac.add_argument("folder", type=Path, metavar="DIR", help="a compare or train --out folder")
    jac.add_argument(
        "--inputs",
        choices=("normal", "test"),
        default="normal",
        help="standard normal inputs of the data's shape (default; seeded) or the first test "
        "examples (mnist/cifar10 need --data-dir)",
    )
    jac.add_argument("--n-inputs", type=int, default=8, metavar="N", help="inputs (default: 8)")
    jac.add_argument("--data-dir", type=Path, metavar="DIR", help="the data, for --inputs test")
    jac.add_argument("--all-runs", action="store_true", help="every reported run, not the first")
    jac.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the rows to FILE (a new file)"
    )
    jac.add_argument(
        "--plot", type=Path, metavar="FILE", help="also plot the spectra to FILE (a new PNG)"
    )
    jac.set_defaults(func=_run_jacobian, command="jacobian")

    report = sub.add_parser(
        "report",
        help="render a results folder's tables and plots again from its results.json",
        description=(
            "Write results.md, results.csv and the plots of a compare/train results folder "
            "again, from its results.json alone (no data, no checkpoints), into a new folder; "
            "the results folder itself is left as it was."
        ),
    )
    report.add_argument("folder", type=Path, metavar="DIR", help="a compare or train --out folder")
    report.add_argument(
        "--out",
        type=Path,
        metavar="OUT",
        help="a new or empty folder for the report (default: DIR/report)",
    )
    report.set_defaults(func=_run_report, command="report")


def _folder_refusal(command: str, folder: Path, *, label: str = "") -> int | None:
    """The exit status of ``approx``/``jacobian``/``report`` refusing ``folder`` in one line (1:
    the extra is missing; 2: no ``results.json``), or ``None`` when it can go on."""
    missing = missing_extra()
    if missing:
        _err(
            f"{command} needs the {EXTRA} extra ({', '.join(missing)} not installed): "
            f'pip install "aon-func[{EXTRA}]"'
        )
        return 1
    if not (folder / "results.json").is_file():
        _err(f"{label}{folder}: no results.json (give the --out folder of compare or train)")
        return 2
    return None


def _new_file_refusal(flag: str, path: Path | None) -> bool:
    """Refuse (one line, ``True``) an output file that exists or whose folder cannot take it."""
    if path is None:
        return False
    if path.exists():
        _err(f"{flag} {path} exists: give a new file (results are never overwritten)")
        return True
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        _err(f"{flag} {path}: {parent} is not a writable folder (create it, or give another path)")
        return True
    return False


def _run_approx(args: argparse.Namespace) -> int:
    refused = _folder_refusal("approx", args.folder)
    if refused is not None:
        return refused
    if args.max_order < 0:
        _err(f"--max-order {args.max_order}: expected an order >= 0")
        return 2
    if _new_file_refusal("--json", args.json):
        return 2
    from .approx import from_results, markdown

    rows = from_results(args.folder, range(args.max_order + 1))
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


def _run_jacobian(args: argparse.Namespace) -> int:
    """``aon-func jacobian DIR``: refuse in one line, or print (and write) the spectra."""
    refused = _folder_refusal("jacobian", args.folder)
    if refused is not None:
        return refused
    if args.n_inputs < 1:
        _err(f"--n-inputs {args.n_inputs}: expected at least 1 input")
        return 2
    if _new_file_refusal("--json", args.json) or _new_file_refusal("--plot", args.plot):
        return 2
    from .data import DataError
    from .jacobian import from_results, markdown, plot

    try:
        rows = from_results(
            args.folder,
            n_inputs=args.n_inputs,
            inputs=args.inputs,
            data_dir=args.data_dir,
            all_runs=args.all_runs,
        )
    except DataError as exc:
        _err(f"--data-dir: {exc}")
        return 2
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    """``aon-func report DIR [--out OUT]``: refuse in one line, or render ``DIR/results.json``."""
    folder: Path = args.folder
    refused = _folder_refusal("report", folder, label="DIR ")
    if refused is not None:
        return refused
    source = folder / "results.json"
    try:
        payload = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        _err(f"DIR {folder}: results.json is not valid JSON ({exc})")
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        _err(f"DIR {folder}: cannot read results.json ({exc})".splitlines()[0])
        return 2
    out: Path = args.out if args.out is not None else folder / "report"
    if out.exists() and not out.is_dir():
        _err(f"--out {out}: exists and is not a folder (give a new or empty folder)")
        return 2
    if out.is_dir() and any(out.iterdir()):
        _err(
            f"--out {out}: exists and is not empty (a report never overwrites; give a new or "
            "empty folder)"
        )
        return 2
    from .report import comparison_lines, results_markdown, summarise, text_table, write_results

    try:  # everything the tables read, before anything is written
        rows = summarise(payload["methods"])
        results_markdown(payload, rows)
        _payload_plots(out, payload, check_only=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        what = what.splitlines()[0] if what else type(exc).__name__
        _err(f"DIR {folder}: results.json is not one that compare or train writes ({what})")
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _err(f"--out {out}: cannot create the folder ({exc.strerror or exc})")
        return 2
    write_results(out, payload, write_json=False)
    names = [p.name for p in _payload_plots(out, payload)]
    print(text_table(rows))
    for line in comparison_lines(payload["comparisons"], payload["config"]["seeds"], len(rows)):
        print(line)
    print(f"report: {out / 'results.md'} (also results.csv, {', '.join(names)})")
    return 0


def _payload_plots(out: Path, payload: dict[str, Any], *, check_only: bool = False) -> list[Path]:
    """:func:`.report.write_plots` of a ``results.json`` payload: every method's runs, the
    split and the test accuracy intervals (``check_only``: gather them, write nothing)."""
    from .report import write_plots

    methods = payload["methods"]
    runs = [
        {**r, "method": r.get("method", name)} for name, m in methods.items() for r in m["runs"]
    ]
    intervals = {name: m.get("test_acc_ci95") for name, m in methods.items()}
    if check_only:
        return []
    return write_plots(
        out, payload["config"], runs, split=payload.get("split"), intervals=intervals
    )


def _run_compare(args: argparse.Namespace) -> int:
    return _run(args, list(args.methods))


def _run_train(args: argparse.Namespace) -> int:
    return _run(args, [args.method])


def _err(message: str) -> None:
    print(f"aon-func: error: {message}", file=sys.stderr)


def missing_extra() -> list[str]:
    """The distributions of the experiments extra that are not installed (by pip name)."""
    missing = []
    for module, dist in EXTRA_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocked or broken module
            found = False
        if not found:
            missing.append(dist)
    return missing


def _has_results(folder: Path) -> bool:
    return folder.is_dir() and any((folder / a).exists() for a in _ARTEFACTS)


def _claim_out(out: Path, resume: bool) -> Path:
    """The folder to write into: ``out``, or with existing results and no resume, beside it."""
    if resume or not _has_results(out):
        return out
    if not out.name:  # "." or "..": name the folder beside it from its full path
        out = out.resolve()
    if not out.name:
        raise UsageError(f"--out {out} already holds results: give a folder of its own")
    i = 2
    while _has_results(out.with_name(f"{out.name}-{i}")):
        i += 1
    beside = out.with_name(f"{out.name}-{i}")
    print(
        f"aon-func: {out} already holds results; writing to {beside} instead "
        f"(use --resume to continue {out})",
        file=sys.stderr,
    )
    return beside


def _make_out(out: Path) -> list[Path]:
    """Create ``out`` (and its parents) or raise a one-line :class:`UsageError`.

    Returns the folders it created, deepest first, for :func:`_remove_empty`.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder for the results")
    created: list[Path] = []
    folder = out
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        _remove_empty(created)
        raise UsageError(f"--out {out}: the folder is not writable")
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the ``folders`` (deepest first) that are still empty: a failed start leaves none."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _stored_epochs(out: Path) -> int | None:
    """The ``--epochs`` that folder ``out`` was run with (its ``config.json``), if known."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    epochs = config.get("epochs") if isinstance(config, dict) else None
    return epochs if isinstance(epochs, int) else None


def _stored_config(out: Path) -> dict[str, Any]:
    """Folder ``out``'s ``config.json`` (``{}`` when it is missing or unreadable)."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _check_resume_covers(out: Path, methods: list[str], seeds: int) -> None:
    """Refuse a ``--resume`` that would rewrite ``out``'s results with fewer runs than it holds."""
    config = _stored_config(out)
    stored = config.get("methods")
    dropped = [m for m in stored if m not in methods] if isinstance(stored, list) else []
    stored_seeds = config.get("seeds")
    fewer = isinstance(stored_seeds, int) and seeds < stored_seeds
    if dropped or fewer:
        what = []
        if dropped:
            what.append(f"the methods {', '.join(dropped)}")
        if fewer:
            what.append(f"{stored_seeds} seeds (--seeds {seeds} asks for fewer)")
        raise UsageError(
            f"--resume: {out} holds {' and '.join(what)}: resuming with fewer would rewrite "
            "its results without them; resume with its --methods and --seeds (more is fine), "
            "or use another --out"
        )


# What a folder's runs depend on besides their methods, seeds and epochs: a --resume with
# another value would mix runs of two configurations (checked before anything is written).
_IDENTITY = (
    "command", "dataset", "model", "depth", "width", "activation", "tune", "tune_seeds",
    "grid", "batch_size", "lr", "normalise_head", "gain", "gain_init", "train_size",
    "val_fraction", "default_order",
)  # fmt: skip


def _check_resume_identity(out: Path, config: Mapping[str, Any]) -> None:
    """Refuse a ``--resume`` of ``out`` with other options than it was started with."""
    stored = _stored_config(out)
    if not stored:
        raise UsageError(
            f"--resume: {out / 'config.json'} is missing or unreadable, so the options {out} was "
            "started with are unknown; its files are left as they are: use another --out"
        )
    new = json.loads(json.dumps({k: config[k] for k in _IDENTITY}))
    differ = [k for k in _IDENTITY if k in stored and stored[k] != new[k]]
    if differ:
        what = "; ".join(f"{k} {stored[k]!r} there, {new[k]!r} now" for k in differ)
        raise UsageError(
            f"--resume: {out} was started with other options ({what}); resume it with the "
            "options it was started with, or use another --out (its files are left as they are)"
        )


def _check_resume(
    args: argparse.Namespace,
    out: Path,
    methods: list[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> int | None:
    """Check ``--resume``/``--extend`` against folder ``out``; the epochs to extend from, if any."""
    if args.extend and not args.resume:
        raise UsageError("--extend trains the runs of a folder on: use it with --resume")
    if not args.resume:
        return None
    if not _has_results(out):
        print(f"aon-func: --resume: {out} holds no runs yet; starting them", file=sys.stderr)
        return None
    if config is not None:
        _check_resume_identity(out, config)
    if methods is not None:
        _check_resume_covers(out, methods, args.seeds)
    stored = _stored_epochs(out)
    if stored is None or stored == args.epochs:
        return None
    if args.epochs < stored:
        raise UsageError(
            f"--resume --epochs {args.epochs}: {out} was started with --epochs {stored}; "
            f"resume it with --epochs {stored}"
        )
    if not args.extend:
        raise UsageError(
            f"--resume --epochs {args.epochs}: {out} was started with --epochs {stored}; "
            f"add --extend to train its runs on to {args.epochs} epochs (its results move "
            f"into {out / f'epochs-{stored}'}), or resume with --epochs {stored}"
        )
    return stored


def _archive_results(out: Path, epochs: int) -> Path:
    """Move ``out``'s result files (and a copy of its config) into ``out/epochs-N`` (a new folder)."""
    dest = out / f"epochs-{epochs}"
    i = 2
    while dest.exists():
        dest = out / f"epochs-{epochs}-{i}"
        i += 1
    dest.mkdir()
    if (out / "config.json").exists():
        shutil.copy2(out / "config.json", dest / "config.json")
    for name in _RESULT_FILES:
        if (out / name).exists():
            os.replace(out / name, dest / name)
    return dest


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _terminal_columns() -> int:
    """The width of the terminal on stderr; 0 when stderr is no terminal or reports none."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _run(args: argparse.Namespace, methods: list[Method]) -> int:
    missing = missing_extra()
    if missing:
        _err(
            f"{args.command} needs the {EXTRA} extra ({', '.join(missing)} not installed): "
            f'pip install "aon-func[{EXTRA}]"'
        )
        return 1
    from .data import DataError
    from .train import ResumeError

    threads = torch.get_num_threads()
    try:
        return _run_checked(args, methods)
    except (DataError, UsageError, ResumeError) as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        print(
            "\naon-func: interrupted; every finished epoch is checkpointed: "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _run_checked(args: argparse.Namespace, methods: list[Method]) -> int:
    from . import train
    from .data import TRAIN_SIZES, check_dataset_args, load_dataset, split_validation, subsample
    from .protocol import TuneGrid, commit, grid, machine, select
    from .report import comparison_lines, text_table, write_results

    # Everything that needs no data first: a mistake costs no data generation.
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = args.model or default_model(args.dataset)
    check_dataset_args(args.dataset, args.data_dir)
    deep = model in DEEP_MODELS
    try:
        # every data set has 10 classes; the shape alone decides whether a model fits
        build_model(
            model,
            DATASET_SHAPES[args.dataset],
            10,
            dataset=args.dataset,
            depth=args.depth,
            width=args.width,
            activation=args.activation,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    known = TRAIN_SIZES.get(args.dataset)
    if args.train_size is not None and known is not None and args.train_size > known:
        raise UsageError(
            f"--train-size {args.train_size}: {args.dataset} has only {known} training examples"
        )
    if args.train_size is not None and args.train_size < 2:
        raise UsageError(f"--train-size {args.train_size}: at least 2 (train and validation)")
    tune = TuneGrid(
        lrs=args.tune_lrs,
        lambdas=args.tune_lambdas,
        decays=args.tune_decays,
        orders=args.tune_orders,
        scales=args.tune_scales,
    )
    tune_seeds = list(range(args.tune_seeds)) if args.tune else []
    eval_seeds = list(range(len(tune_seeds), len(tune_seeds) + args.seeds))
    scale = Scale(args.normalise_head, args.gain, args.gain_init)
    config: dict[str, Any] = {
        "command": args.command,
        "dataset": args.dataset,
        "model": model,
        "depth": args.depth if deep else None,
        "width": args.width if deep else None,
        "activation": args.activation if deep else None,
        "methods": [m.name for m in methods],
        "epochs": args.epochs,
        "seeds": args.seeds,
        "eval_seeds": eval_seeds,
        "tune": args.tune,
        "tune_seeds": tune_seeds,
        "grid": (
            {
                "lrs": list(tune.lrs),
                "lambdas": list(tune.lambdas),
                "decays": list(tune.decays),
                "orders": list(tune.orders),
                "scales": [{"normalise_head": h, "gain": g} for h, g in tune.scales],
            }
            if args.tune
            else None
        ),
        "batch_size": args.batch_size,
        "lr": None if args.tune else args.lr,
        "normalise_head": None if args.tune else args.normalise_head,
        "gain": None if args.tune else args.gain,
        "gain_init": args.gain_init,
        "scale": "chosen per method on validation (--tune-scales)"
        if args.tune
        else scale.describe(),
        "train_size": args.train_size,
        "val_fraction": args.val_fraction,
        "default_order": DEFAULT_ORDER,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if args.extend and not args.resume:  # before a folder beside --out is chosen
        raise UsageError("--extend trains the runs of a folder on: use it with --resume")
    out = _claim_out(args.out or Path("runs") / args.command, args.resume)
    created = _make_out(out)
    try:
        extend_from = _check_resume(args, out, [m.name for m in methods], config)
        data = subsample(load_dataset(args.dataset, args.data_dir), args.train_size)
    except BaseException:
        _remove_empty(created)
        raise
    if extend_from is not None:
        moved = _archive_results(out, extend_from)
        print(
            f"aon-func: --extend: the {extend_from}-epoch results of {out} are now in {moved}",
            file=sys.stderr,
        )
    sizes = split_validation(data, args.val_fraction, 0).sizes()
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")

    plans = {m.name: grid(m, tune) if args.tune else [_fixed_point(m, args)] for m in methods}
    n_runs = sum(len(g) * len(tune_seeds) + len(eval_seeds) for g in plans.values())
    bar = _progress_bar(n_runs * args.epochs) if not args.quiet else None
    log = not args.quiet and bar is None
    done = 0

    def run(method: Method, point: Any, seed: int, folder: Path) -> dict[str, Any]:
        nonlocal done
        cfg = train.RunConfig(
            dataset=args.dataset,
            model=model,
            method=point.method.name,
            seed=seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=point.lr,
            normalise_head=point.normalise_head,
            gain=point.gain,
            gain_init=args.gain_init,
            val_fraction=args.val_fraction,
            train_size=args.train_size or 0,
            depth=args.depth if deep else 0,
            width=(args.width or 0) if deep else 0,
            activation=args.activation if deep else "",
        )
        on_epoch = None
        if bar is not None:
            bar.set_description_str(
                f"run {done + 1}/{n_runs} {point.method.name} seed {seed}", refresh=False
            )
            on_epoch = _advance(bar, done * args.epochs)
        ckpt = folder / f"seed{seed}.pt"
        result = train.train_run(
            cfg,
            data,
            ckpt,
            device=device,
            resume=args.resume,
            on_epoch=on_epoch,
        )
        done += 1
        result = {**result, "checkpoint": ckpt.relative_to(out).as_posix()}
        if log:
            print(
                f"{point.method.name} seed {seed}: val acc {100 * result['val_acc']:.1f}%, "
                f"test acc {100 * result['test_acc']:.1f}%, "
                f"train loss {result['train_loss']:.3f}, "
                f"orth. error {result['ortho_error']:.3f}, "
                f"{result['sec_per_epoch']:.3f} s/epoch",
                file=sys.stderr,
                flush=True,
            )
        return result

    per_method: dict[str, dict[str, Any]] = {}
    try:
        for method in methods:
            base = out / "runs" / _safe(method.name)
            points = plans[method.name]
            tried: list[dict[str, Any]] = []
            if args.tune:
                for point in points:
                    rs = [run(method, point, s, base / _safe(point.key())) for s in tune_seeds]
                    tried.append({"point": point, "val_accs": [r["val_acc"] for r in rs]})
                chosen = points[select([t["val_accs"] for t in tried])]
                folder = base / _safe(chosen.key())
            else:
                chosen, folder = points[0], base
            runs = [run(method, chosen, s, folder) for s in eval_seeds]
            if not args.tune:
                tried = [{"point": chosen, "val_accs": [r["val_acc"] for r in runs]}]
            per_method[method.name] = {
                "method": method,
                "chosen": chosen,
                "tried": tried,
                "runs": runs,
            }
    finally:
        if bar is not None:
            bar.close()
    payload = _payload(args, config, methods, per_method, sizes, device, commit(), machine)
    rows = write_results(out, payload)
    plots = [p.name for p in _payload_plots(out, payload)]
    what = (
        f"tuned on validation over seeds {tune_seeds[0]}..{tune_seeds[-1]}, " if args.tune else ""
    )
    print(
        f"{args.dataset} / {model}, {args.epochs} epochs, {args.seeds} seed(s); {what}"
        f"split train {sizes['train']} / val {sizes['val']} / test {sizes['test']}; "
        f"{config['scale']}"
    )
    print(text_table(rows))
    for line in comparison_lines(payload["comparisons"], args.seeds, len(methods)):
        print(line)
    if args.command == "compare":
        print(STUDY_POINTER)
    print(f"results: {out / 'results.md'} (also results.json, results.csv, {', '.join(plots)})")
    return 0


def _fixed_point(method: Method, args: argparse.Namespace) -> Any:
    """The one configuration of a run without ``--tune``: the options as given."""
    from .protocol import GridPoint

    return GridPoint(method, args.lr, args.normalise_head, args.gain)


def _payload(
    args: argparse.Namespace,
    config: dict[str, Any],
    methods: list[Method],
    per_method: dict[str, dict[str, Any]],
    sizes: dict[str, int],
    device: torch.device,
    commit: str,
    machine: Callable[[torch.device, int], dict[str, Any]],
) -> dict[str, Any]:
    """``results.json``: provenance, split, each method's selection and runs, the comparisons."""
    import statistics as st

    from . import stats
    from .protocol import pairs, references

    out_methods: dict[str, Any] = {}
    sel_val: dict[str, float] = {}
    for name, pm in per_method.items():
        runs = []
        for r in pm["runs"]:
            r = dict(r)
            r["method"] = name  # the method as asked for; r["config"] holds the concrete one
            r["label"] = pm["chosen"].method.label
            runs.append(r)
        grid_rows = [
            {
                **t["point"].describe(),
                "val_acc": st.fmean(t["val_accs"]),
                "val_accs": t["val_accs"],
            }
            for t in pm["tried"]
        ]
        chosen = pm["chosen"].describe()
        sel_val[name] = next(
            g["val_acc"]
            for g in grid_rows
            if g["method"] == chosen["method"]
            and g["lr"] == chosen["lr"]
            and g["normalise_head"] == chosen["normalise_head"]
            and g["gain"] == chosen["gain"]
        )
        accs = [r["test_acc"] for r in runs]
        out_methods[name] = {
            "label": pm["chosen"].method.label,
            "selected": {**chosen, "gain_init": args.gain_init, "val_acc": sel_val[name]},
            "grid": grid_rows,
            "runs": runs,
            "test_acc_mean": st.fmean(accs),
            "test_acc_ci95": list(stats.bca_interval(accs)),
        }
    refs = references(methods, sel_val)
    names = [m.name for m in methods]
    comparisons = stats.compare(
        {n: [r["test_acc"] for r in out_methods[n]["runs"]] for n in names}, pairs(names, refs)
    )
    return {
        "commit": commit,
        "machine": machine(device, args.threads),
        "split": sizes,
        "units": "accuracies are fractions in [0, 1]",
        "config": config,
        "references": refs,
        "methods": out_methods,
        "comparisons": comparisons,
    }


def _progress_bar(total_epochs: int) -> Any:
    """One tqdm bar over every epoch of every run, or ``None`` without a wide enough terminal."""
    if not sys.stderr.isatty() or _terminal_columns() < MIN_BAR_COLUMNS:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True)


def _advance(bar: Any, done_before: int) -> Callable[[int, dict[str, Any]], None]:
    """The ``on_epoch`` callback of one run: move ``bar`` to its epoch, show loss and accuracy."""

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            val=f"{100 * record['val_acc']:.1f}%",
            refresh=False,
        )
        bar.update(done_before + epoch - bar.n)

    return on_epoch

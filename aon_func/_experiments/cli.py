"""``aon-func compare`` and ``aon-func train``: the comparison experiments.

``compare`` trains the same model with each method (``--methods``) for
``--seeds`` seeds and writes ``results.json``, ``results.csv``,
``results.md``, ``accuracy.png`` and ``spectra.png`` into ``--out``; ``train``
does the same for one method. Every run is checkpointed after every epoch in
``--out/runs/``; ``--resume`` continues them.

``--out`` is never overwritten: without ``--resume``, a folder that already
holds results (``results.json``, ``config.json`` or ``runs/``) is left alone
and the new results go beside it, into the first free ``OUT-2``, ``OUT-3``...
(the command says so). With ``--resume`` the given folder is continued, for
the number of epochs it was started with; ``--extend`` trains it on to a
larger ``--epochs`` and first moves its results into ``OUT/epochs-N/``.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import DEFAULT_ORDER
from .methods import METHOD_NAMES, Method, Scale, parse_method, parse_methods
from .models import DATASET_SHAPES, MODELS, build_model, default_model

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

_ARTEFACTS = ("results.json", "config.json", "runs")

_RESULT_FILES = ("results.json", "results.csv", "results.md", "accuracy.png", "spectra.png")

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
    """Add ``compare`` and ``train`` to the ``aon-func`` sub-command parsers ``sub``."""
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


def _check_resume(args: argparse.Namespace, out: Path) -> int | None:
    """Check ``--resume``/``--extend`` against folder ``out``; the epochs to extend from, if any."""
    if args.extend and not args.resume:
        raise UsageError("--extend trains the runs of a folder on: use it with --resume")
    if not args.resume:
        return None
    if not _has_results(out):
        print(f"aon-func: --resume: {out} holds no runs yet; starting them", file=sys.stderr)
        return None
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
    from .data import check_dataset_args, load_dataset
    from .report import text_table, write_plots, write_results

    # Everything that needs no data first: a mistake costs no data generation.
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = args.model or default_model(args.dataset)
    check_dataset_args(args.dataset, args.data_dir)
    try:
        # every data set has 10 classes; the shape alone decides whether a model fits
        build_model(model, DATASET_SHAPES[args.dataset], 10, dataset=args.dataset)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    scale = Scale(args.normalise_head, args.gain, args.gain_init)
    out = _claim_out(args.out or Path("runs") / args.command, args.resume)
    created = _make_out(out)
    try:
        extend_from = _check_resume(args, out)
        data = load_dataset(args.dataset, args.data_dir)
    except BaseException:
        _remove_empty(created)
        raise
    if extend_from is not None:
        moved = _archive_results(out, extend_from)
        print(
            f"aon-func: --extend: the {extend_from}-epoch results of {out} are now in {moved}",
            file=sys.stderr,
        )
    config: dict[str, Any] = {
        "command": args.command,
        "dataset": args.dataset,
        "model": model,
        "methods": [m.name for m in methods],
        "epochs": args.epochs,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "normalise_head": args.normalise_head,
        "gain": args.gain,
        "gain_init": args.gain_init,
        "scale": scale.describe(),
        "default_order": DEFAULT_ORDER,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    n_runs = len(methods) * args.seeds
    bar = _progress_bar(n_runs * args.epochs) if not args.quiet else None
    log = not args.quiet and bar is None
    runs: list[dict[str, Any]] = []
    try:
        for method in methods:
            for seed in range(args.seeds):
                cfg = train.RunConfig(
                    dataset=args.dataset,
                    model=model,
                    method=method.name,
                    seed=seed,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    normalise_head=args.normalise_head,
                    gain=args.gain,
                    gain_init=args.gain_init,
                )
                on_epoch = None
                if bar is not None:
                    bar.set_description_str(
                        f"run {len(runs) + 1}/{n_runs} {method.name} seed {seed}", refresh=False
                    )
                    on_epoch = _advance(bar, len(runs) * args.epochs)
                ckpt = out / "runs" / _safe(method.name) / f"seed{seed}.pt"
                result = train.train_run(
                    cfg, data, ckpt, device=device, resume=args.resume, on_epoch=on_epoch
                )
                runs.append(result)
                if log:
                    print(
                        f"{method.name} seed {seed}: test acc {100 * result['test_acc']:.1f}%, "
                        f"train loss {result['train_loss']:.3f}, "
                        f"orth. error {result['ortho_error']:.3f}, "
                        f"{result['sec_per_epoch']:.3f} s/epoch",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if bar is not None:
            bar.close()
    rows = write_results(out, config, runs)
    write_plots(out, config, runs)
    print(
        f"{args.dataset} / {model}, {args.epochs} epochs, {args.seeds} seed(s); {scale.describe()}"
    )
    print(text_table(rows))
    print(
        f"results: {out / 'results.md'} (also results.json, results.csv, accuracy.png, spectra.png)"
    )
    return 0


def _progress_bar(total_epochs: int) -> Any:
    """One tqdm bar over every epoch of every run, or ``None`` without a wide enough terminal."""
    if not sys.stderr.isatty() or _terminal_columns() < MIN_BAR_COLUMNS:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True)


def _advance(bar: Any, done_before: int) -> Callable[[int, dict[str, float]], None]:
    """The ``on_epoch`` callback of one run: move ``bar`` to its epoch, show loss and accuracy."""

    def on_epoch(epoch: int, record: dict[str, float]) -> None:
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            acc=f"{100 * record['test_acc']:.1f}%",
            refresh=False,
        )
        bar.update(done_before + epoch - bar.n)

    return on_epoch

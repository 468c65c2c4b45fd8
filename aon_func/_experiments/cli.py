"""``aon-func compare`` and ``aon-func train``: the comparison experiments.

``compare`` trains the same model with each method (``--methods``) for
``--seeds`` seeds and writes ``results.json``, ``results.csv``,
``results.md``, ``accuracy.png`` and ``spectra.png`` into ``--out``; ``train``
does the same for one method. Every run is checkpointed after every epoch in
``--out/runs/``; ``--resume`` continues them.

``--out`` is never overwritten: without ``--resume``, a folder that already
holds results (``results.json``, ``config.json`` or ``runs/``) is left alone
and the new results go beside it, into the first free ``OUT-2``, ``OUT-3``...
(the command says so). With ``--resume`` the given folder is continued.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .. import DEFAULT_ORDER
from .data import DATASETS, DataError, Dataset, load_dataset
from .methods import Method, Scale, parse_method, parse_methods
from .models import MODELS, build_model, default_model
from .report import text_table, write_plots, write_results
from .train import ResumeError, RunConfig, train_run

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
    g.add_argument("--dataset", choices=DATASETS, default="mnist1d", help="default: mnist1d")
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
    g.add_argument("--resume", action="store_true", help="continue the runs checkpointed in --out")
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
        help=f"comma-separated (default: {DEFAULT_METHODS}); also aon (= aon-{DEFAULT_ORDER}), "
        "oni-T, ns, ns-T, soft:LAMBDA, srip:LAMBDA",
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
        help="plain, sn, aon, aon-K, oni, oni-T, ns, ns-T, polar, soft[:LAMBDA], srip[:LAMBDA]",
    )
    _common(train)
    train.set_defaults(func=_run_train, command="train")


def _run_compare(args: argparse.Namespace) -> int:
    return _run(args, list(args.methods))


def _run_train(args: argparse.Namespace) -> int:
    return _run(args, [args.method])


def _err(message: str) -> None:
    print(f"aon-func: error: {message}", file=sys.stderr)


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _run(args: argparse.Namespace, methods: list[Method]) -> int:
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
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = args.model or default_model(args.dataset)
    if args.data_dir is not None and args.dataset not in ("mnist", "cifar10"):
        raise UsageError(
            f"--data-dir is for mnist and cifar10; --dataset {args.dataset} needs none"
        )
    data: Dataset = load_dataset(args.dataset, args.data_dir)
    try:
        build_model(model, data.input_shape, data.n_classes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    scale = Scale(args.normalise_head, args.gain, args.gain_init)
    out = _claim_out(args.out or Path("runs") / args.command, args.resume)
    out.mkdir(parents=True, exist_ok=True)
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
    progress = not args.quiet and sys.stderr.isatty()
    log = not args.quiet and not progress
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in range(args.seeds):
            cfg = RunConfig(
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
            ckpt = out / "runs" / _safe(method.name) / f"seed{seed}.pt"
            result = train_run(
                cfg, data, ckpt, device=device, resume=args.resume, progress=progress
            )
            runs.append(result)
            if log:
                print(
                    f"{method.name} seed {seed}: test acc {100 * result['test_acc']:.1f}%, "
                    f"train loss {result['train_loss']:.3f}, orth. error {result['ortho_error']:.3f}, "
                    f"{result['sec_per_epoch']:.3f} s/epoch",
                    file=sys.stderr,
                    flush=True,
                )
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

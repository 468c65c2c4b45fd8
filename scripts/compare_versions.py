"""``AON.apply`` of this checkout against another version's, side by side in one process.

Loads the other version's package from its checkout under another name, then
times both versions' ``AON(order=K).apply`` (forward, and forward+backward)
and the matmul roofline on the bench's weight-shape sets, in interleaved
rounds (medians of per-round ratios after warm-up). For example, against
v0.1:

    git worktree add ../aon-v0.1 fbf940d
    python scripts/compare_versions.py ../aon-v0.1 --threads 1 --clock cpu
    python scripts/compare_versions.py ../aon-v0.1 --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from aon_func import AON
from aon_func._bench._suite import (
    _fwd_bwd,
    _model_params,
    _roofline_fn,
    _weights_of,
    roofline_products,
)
from aon_func._bench._timing import time_interleaved
from aon_func._layout import Layout


def load_other(checkout: Path, alias: str = "aon_func_other") -> ModuleType:
    """Import ``checkout/aon_func`` as the package ``alias`` (its relative imports included)."""
    init = checkout / "aon_func" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        alias, init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no aon_func package under {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def parse_args(doc: str, **extra: Any) -> argparse.Namespace:
    """The options both side-by-side scripts take (``extra``: more, name to ``add_argument`` kwargs)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="the other version's checkout")
    ap.add_argument("--models", default="mlp,resnet18,resnet50,vit_s16")
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None)
    for name, kwargs in extra.items():
        ap.add_argument(f"--{name}", **kwargs)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


class Pair(NamedTuple):
    """One model's weights and the two versions' transforms over them."""

    params: dict[str, Tensor]
    layouts: dict[str, Layout]
    this: AON
    other: Any
    state: dict[str, Tensor]
    inputs: list[Tensor]


def pair(name: str, other: ModuleType, order: int) -> Pair:
    """Model ``name``'s weights, ``AON(order=order)`` of this checkout and of ``other``, one state."""
    params, out_axes, layouts = _model_params(name, torch.device("cpu"), torch.float32)
    include = frozenset(params)
    new = AON(include=include, out_axes=out_axes, order=order)
    old = other.AON(include=include, out_axes=out_axes, order=order)
    state = new.init(params, generator=torch.Generator().manual_seed(0))
    return Pair(params, layouts, new, old, state, list(params.values()))


def main() -> None:
    args = parse_args(__doc__, clock={"choices": ("wall", "cpu"), "default": "wall"})
    other = load_other(args.checkout)
    device = torch.device("cpu")
    print(
        f"this checkout vs {args.checkout}: K = {args.order}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock\n"
    )
    print(
        "| shapes | this fwd / roofline | other fwd / roofline | this / other fwd "
        "| this fwd+bwd / roofline | other fwd+bwd / roofline | this / other fwd+bwd | rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        params, layouts, new, old, state, inputs = pair(name, other, args.order)
        fns = {}
        for key, tr in (("this", new), ("other", old)):
            fwd = _weights_of(tr.apply, params, state)
            fns[f"{key}/fwd"] = fwd
            fns[f"{key}/fwd+bwd"] = _fwd_bwd(fwd, inputs)
        for mode in ("fwd", "fwd+bwd"):
            prods = roofline_products(layouts, args.order, backward=mode == "fwd+bwd")
            fns[f"roofline/{mode}"] = _roofline_fn(prods, device, torch.float32)
        t = time_interleaved(
            fns, device, repeats=args.repeats, warmup=2, budget_s=args.budget, clock=args.clock
        )
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            cells += [
                f"{t.ratio(f'this/{mode}', f'roofline/{mode}'):.2f}",
                f"{t.ratio(f'other/{mode}', f'roofline/{mode}'):.2f}",
                f"{t.ratio(f'this/{mode}', f'other/{mode}'):.3f}",
            ]
        print(f"| {name} | " + " | ".join(cells) + f" | {len(t.rounds)} |", flush=True)


if __name__ == "__main__":
    main()

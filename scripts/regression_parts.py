"""Where this checkout's CPU ``AON.apply`` forward differs from another version's: parts switched off.

Times, side by side in one process (interleaved rounds, medians of per-round
ratios after warm-up, as ``scripts/compare_versions.py``), the other
version's ``AON(order=K).apply`` against this checkout's, as it is and with
two of its parts replaced for the measurement only:

- ``no safeguard``: the Gram iterations per call are ``n_power_iterations``
  (1) instead of at least ``SAFEGUARD_ITERATIONS`` (12): the cost of the
  stale-state safeguard (docs/failure-modes.md);
- ``plain final product``: ``h = (P s) Z`` by autograd instead of the
  ``_ScaledMm`` function, which keeps ``P`` rather than ``P s`` for the
  backward (one ``k x k`` tensor less per matrix: docs/performance.md,
  "Memory"): the cost of that saving in time.

Neither replacement is an option of the library; they are what the
regression against v0.1 is made of. For example:

    git worktree add ../aon-v0.1 fbf940d
    python scripts/regression_parts.py ../aon-v0.1 --threads 2
    python scripts/regression_parts.py ../aon-v0.1 --threads 1 --clock cpu
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from compare_versions import load_other, pair, parse_args
from torch import Tensor

import aon_func._kernel as kernel
from aon_func._bench._suite import _fwd_bwd, _weights_of
from aon_func._bench._timing import time_interleaved

VARIANTS = {
    "as is": (),
    "no safeguard": ("iterations",),
    "plain final product": ("product",),
    "both": ("iterations", "product"),
}


_KERNEL_SCALED_MM = kernel._scaled_mm


def _plain_scaled_mm(p: Tensor, s: Tensor, z: Tensor, plain: bool) -> Tensor:
    """The kernel's final product on its plain-autograd path (forward mode's), in reverse mode too."""
    return _KERNEL_SCALED_MM(p, s, z, True)


@contextmanager
def _replaced(parts: tuple[str, ...]) -> Iterator[None]:
    saved = (kernel.gram_iterations, kernel._scaled_mm)
    if "iterations" in parts:
        kernel.gram_iterations = lambda n: n
    if "product" in parts:
        kernel._scaled_mm = _plain_scaled_mm
    try:
        yield
    finally:
        kernel.gram_iterations, kernel._scaled_mm = saved


def _with(parts: tuple[str, ...], fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with _replaced(parts):
            return fn()

    return run


def main() -> None:
    args = parse_args(__doc__, clock={"choices": ("wall", "cpu"), "default": "wall"})
    other = load_other(args.checkout)
    device = torch.device("cpu")
    print(
        f"this checkout's variants vs {args.checkout}: K = {args.order}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; this / other\n"
    )
    head = " | ".join(f"{v} fwd | {v} fwd+bwd" for v in VARIANTS)
    print(f"| shapes | {head} | rounds |")
    print("|---|" + "---:|" * (2 * len(VARIANTS)) + "---:|")
    for name in args.models.split(","):
        params, _, new, old, state, inputs = pair(name, other, args.order)
        fwd_old = _weights_of(old.apply, params, state)
        fns: dict[str, Callable[[], object]] = {
            "other/fwd": fwd_old,
            "other/fwd+bwd": _fwd_bwd(fwd_old, inputs),
        }
        fwd_new = _weights_of(new.apply, params, state)
        for v, parts in VARIANTS.items():
            fns[f"{v}/fwd"] = _with(parts, fwd_new)
            fns[f"{v}/fwd+bwd"] = _with(parts, _fwd_bwd(fwd_new, inputs))
        t = time_interleaved(
            fns, device, repeats=args.repeats, warmup=2, budget_s=args.budget, clock=args.clock
        )
        cells = [
            f"{t.ratio(f'{v}/{mode}', f'other/{mode}'):.3f}"
            for v in VARIANTS
            for mode in ("fwd", "fwd+bwd")
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {len(t.rounds)} |", flush=True)


if __name__ == "__main__":
    main()

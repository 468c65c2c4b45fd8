"""What the stale-state safeguard costs: ``AON.apply`` forward with 12 Gram iterations against 1.

``SAFEGUARD_ITERATIONS`` (12) Gram iterations run per call for ``K >= 1``;
v0.1 ran one. This times ``apply`` forward both ways, side by side in one
process (interleaved rounds, medians of per-round ratios after warm-up), on
the bench's weight-shape sets, with one thread and the process's CPU clock
(robust to other load on the machine):

    python scripts/safeguard_cost.py
    python scripts/safeguard_cost.py --models resnet18,resnet50 --orders 1,2 --repeats 21
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

import aon_func._kernel as kernel
from aon_func import AON
from aon_func._bench._suite import _model_params
from aon_func._bench._timing import time_interleaved


def _with_floor(
    tr: AON, params: dict[str, Tensor], state: dict[str, Tensor], floor: int
) -> Callable[[], object]:
    """``tr.apply(params, state)`` with ``SAFEGUARD_ITERATIONS`` set to ``floor`` for the call."""

    def run() -> object:
        saved = kernel.SAFEGUARD_ITERATIONS
        kernel.SAFEGUARD_ITERATIONS = floor
        try:
            return tr.apply(params, state)
        finally:
            kernel.SAFEGUARD_ITERATIONS = saved

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mlp,tiny")
    ap.add_argument("--orders", default="1,2")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print("| shapes | K | apply fwd ms (1 iteration) | 12 iterations / 1 | spread |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        params, out_axes, _ = _model_params(name, device, torch.float32)
        params = {k: v.detach() for k, v in params.items()}
        for order in (int(o) for o in args.orders.split(",")):
            tr = AON(include=frozenset(params), out_axes=out_axes, order=order)
            state = tr.init(params)
            with torch.no_grad():
                t = time_interleaved(
                    {
                        "one": _with_floor(tr, params, state, 1),
                        "twelve": _with_floor(tr, params, state, 12),
                    },
                    device,
                    repeats=args.repeats,
                    warmup=2,
                    clock="cpu",
                )
            ratio = t.ratio("twelve", "one")
            spread = max(t.spread("one"), t.spread("twelve"))
            print(
                f"| {name} | {order} | {1e3 * t.median('one'):.2f} | {ratio:.3f} | {spread:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

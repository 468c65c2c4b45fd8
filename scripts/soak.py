"""Soak run behind docs/failure-modes.md: large SGD steps, does ``||h||_2`` stay bounded?

MLP 32-64-64-10 on random data (256 examples, 10 classes), every linear map
normalised (``AON.for_module(net, order=K, gain=2.0)``), functional training
with ``torch.func.grad`` and plain SGD at learning rate 1.0: each step moves
the weights far, so the power-iteration state ``u`` is stale at every call.
Prints, per order, the largest spectral norm of any normalised weight over
the run (gain divided out) and the loss at the end.

    python scripts/soak.py --steps 3000 --orders 0,1,2,3,4,5,6,7,8
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aon_func


def soak(order: int, steps: int, lr: float, seed: int) -> tuple[float, float, int]:
    """``(max ||h||_2 / gain, final loss, step of the max)``."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    tr = aon_func.AON.for_module(net, order=order, gain=2.0)
    params = {k: v.detach() for k, v in net.named_parameters()}
    state = tr.init(params, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(256, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    names = list(tr.select(params))

    def loss_fn(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out, s = tr.functional_call(net, p, s, x)
        return F.cross_entropy(out, y), s

    worst, at, loss = 0.0, 0, math.nan
    for step in range(steps):
        grads, (value, new_state) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, state)
        # The weights this step used: the same state, not advanced again.
        weights, _ = tr.apply(params, state, training=False)
        for n in names:
            s = float(torch.linalg.matrix_norm(weights[n].double(), ord=2)) / 2.0
            if s > worst:
                worst, at = s, step
        params = {k: v - lr * grads[k] for k, v in params.items()}
        state, loss = new_state, float(value)
    return worst, loss, at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--orders", default="0,1,2,3,4,5,6,7,8")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"| K | max ||h||_2 / gain | at step | loss after {args.steps} steps |")
    print("|---|---:|---:|---:|")
    for order in (int(o) for o in args.orders.split(",")):
        worst, loss, at = soak(order, args.steps, args.lr, args.seed)
        print(f"| {order} | {worst:.4f} | {at} | {loss:.4g} |", flush=True)


if __name__ == "__main__":
    main()

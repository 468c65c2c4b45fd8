"""Fit the bucket cost model of ``aon_func._plan`` (``COSTS``) on this machine's CPU or GPU.

The engine models one call of the batched AON kernel over ``B`` matrices of
``k x N`` as ``per_call + B * flops(k, N) * per_flop`` plus, when ``B > 1``,
``per_byte`` times the bytes that stacking copies (``2 B k N`` elements:
forward and backward). This script times the kernel forward on single
matrices and on stacks (the ``torch.stack`` included), then fits the three
constants by non-negative least squares on relative errors.

    python scripts/fit_cost_model.py                 # CPU, torch's default threads
    python scripts/fit_cost_model.py --device cuda   # on a machine with a GPU
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from aon_func._kernel import aon_matrix, start_vector
from aon_func._plan import flops_per_matrix


def _time(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    flops = flops_per_matrix(args.order)
    rows: list[tuple[float, float, float, float]] = []  # (calls, flops, bytes, seconds)
    shapes = [(k, m * k) for k, m in itertools.product((16, 64, 128, 256, 512), (1, 4, 9))]
    with torch.no_grad():
        for (k, n), b in itertools.product(shapes, (1, 4, 16)):
            if b * k * n > 2**24:
                continue
            mats = [torch.randn(k, n, device=device) for _ in range(b)]
            u = start_vector(k, torch.float32, device)

            def run(mats=mats, u=u, b=b) -> None:  # type: ignore[no-untyped-def]
                if b == 1:
                    aon_matrix(mats[0], u, order=args.order, n_power_iterations=1)
                else:
                    aon_matrix(
                        torch.stack(mats), u.expand(b, -1), order=args.order, n_power_iterations=1
                    )

            t = _time(run, device, args.repeats)
            copied = 2.0 * b * k * n * 4 if b > 1 else 0.0
            rows.append((1.0, b * flops(k, n), copied, t))
            print(f"B={b:3d} k={k:4d} N={n:5d}: {t * 1e3:8.3f} ms", flush=True)
    a = torch.tensor([r[:3] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    w = 1.0 / y  # relative errors: small and large calls count alike
    coef = torch.linalg.lstsq(a * w[:, None], y * w).solution.clamp_min(0.0)
    pred = a @ coef
    err = ((pred - y).abs() / y).median()
    print(
        f"\nCostModel(per_call={coef[0]:.3g}, per_flop={coef[1]:.3g}, per_byte={coef[2]:.3g})"
        f"  # {1 / coef[1] / 1e9:.0f} GFLOP/s; median relative error {float(err):.2f}"
        if coef[1] > 0
        else f"\n{coef.tolist()}"
    )


if __name__ == "__main__":
    main()

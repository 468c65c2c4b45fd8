#!/usr/bin/env python3
"""Accuracy of AON with low-precision products: ``|s_max(h) - 1|`` and the spectrum-map error.

For each product precision (float32; ``matmul_dtype=torch.bfloat16``; TF32 on
CUDA when present) and order K, the worst over a few weight shapes and seeds
of ``|s_max(h) - 1|`` and ``max_i |s_i(h) - f_K(s_i / s_max)|``, with ``u`` the
exact top singular vector. The weights have singular values 1 and
``0.8 .. 0.25`` (condition number 4, a gap under the top one). These are the
figures behind the tolerances of ``tests/test_kernel_precision.py`` and the
table in docs/performance.md, "Precision".

Usage: ``python scripts/precision_accuracy.py [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from aon_func import aon, singular_value_map

F64 = torch.float64
SHAPES = [(64, 576), (256, 2304), (512, 512), (300, 40), (512, 4608), (768, 3072)]
ORDERS = (1, 2, 4, 8)


def spectrum(m: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    k = min(m, n)
    s = torch.cat([torch.ones(1, dtype=F64), torch.linspace(0.8, 0.25, k - 1, dtype=F64)])
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]
    return (u * s) @ v.T, s


def worst(precision: str, order: int, device: torch.device) -> tuple[float, float]:
    top = smap = 0.0
    md = torch.bfloat16 if precision == "bf16" else None
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for m, n in SHAPES:
            for seed in range(2):
                w64, s = spectrum(m, n, seed)
                z = w64 if m <= n else w64.T
                u = torch.linalg.svd(z, full_matrices=False)[0][:, 0].float().to(device)
                h, _ = aon(w64.float().to(device), u, order=order, matmul_dtype=md)
                sv = torch.linalg.svdvals(h.double().cpu())
                top = max(top, abs(float(sv[0]) - 1.0))
                smap = max(smap, float((sv - singular_value_map(s, order)).abs().max()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    return top, smap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    precisions = ["float32", "bf16"] + (["tf32"] if device.type == "cuda" else [])
    print(f"device {device}; shapes {SHAPES}; worst over shapes and 2 seeds")
    print(f"{'products':<10}{'K':>3}{'|s_max - 1|':>14}{'map error':>12}")
    for p in precisions:
        for k in ORDERS:
            top, smap = worst(p, k, device)
            print(f"{p:<10}{k:>3}{top:>14.1e}{smap:>12.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How close the stateless mode's spectral estimate is to ``s_max``, against the number of iterations.

The stateless mode (``aon(w, u=None)``) starts the power iteration from a
fixed vector and, for ``order >= 1``, runs it on the ``k x k`` Gram matrix
(``aon_func._kernel.gram_power_iteration``). This script measures the
relative error ``1 - sigma / s_max`` of the estimate ``sigma`` it reaches
after ``T`` iterations, for Gaussian (freshly initialised) layers of several
sizes, in float32 as a float32 layer is computed, with ``s_max`` from a
float64 SVD. Gaussian layers are the hard case: their top singular values are
nearly tied. The last rows are Gaussian layers whose top singular value was
moved 10% clear of the next.

Usage::

    python scripts/stateless_iterations.py [--seeds 20] [--dtype float32]

It prints the median and the worst error over the seeds for each size and
``T``; ``aon_func.STATELESS_POWER_ITERATIONS`` is the default ``T``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import aon_func
from aon_func._kernel import DEFAULT_EPS, gram_power_iteration, start_vector

SHAPES = [(64, 64), (128, 256), (256, 256), (256, 1024), (512, 512), (1024, 1024)]
GAPPED_SHAPES = [(256, 256), (1024, 1024)]
ITERATIONS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def gaussian(shape: tuple[int, int], seed: int, gap: float | None) -> torch.Tensor:
    """A float64 Gaussian layer; with ``gap``, its top singular value set to ``(1 + gap) s_2``."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if gap is None:
        return w
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s.clone()
    s[0] = (1 + gap) * s[1]
    return (u * s) @ vh


def relative_errors(w: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """``1 - sigma_T / s_max`` for each ``T`` in ``ITERATIONS``, as the stateless kernel computes ``sigma``."""
    s_max = float(torch.linalg.matrix_norm(w, ord=2))
    z = w.to(dtype)
    z = z if z.shape[0] <= z.shape[1] else z.mT
    z = z / z.abs().max()  # the kernel's pre-scale
    s_max /= float(w.abs().max())
    gram = z @ z.mT
    u = start_vector(z.shape[0], dtype, z.device)
    out, done = [], 0
    for t in ITERATIONS:  # continuing from the last u is the same as starting afresh
        u, _, sigma = gram_power_iteration(z, gram, u, t - done, DEFAULT_EPS)
        done = t
        out.append(1.0 - float(sigma) / s_max)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows: list[tuple[str, list[float], list[float]]] = []
    for gap, shapes in ((None, SHAPES), (0.1, GAPPED_SHAPES)):
        for shape in shapes:
            per_seed = [
                relative_errors(gaussian(shape, seed, gap), dtype) for seed in range(args.seeds)
            ]
            cols = list(zip(*per_seed, strict=True))
            med = [statistics.median(col) for col in cols]
            worst = [max(col) for col in cols]
            label = f"{shape[0]}x{shape[1]}" + (" gap 10%" if gap else "")
            rows.append((label, med, worst))

    print(
        f"1 - sigma/s_max of the stateless Gram power iteration ({args.dtype}, {args.seeds} seeds; "
        f"default T = {aon_func.STATELESS_POWER_ITERATIONS})"
    )
    header = f"{'layer':<18}{'':>7}" + "".join(f"{'T=' + str(t):>10}" for t in ITERATIONS)
    print(header)
    print("-" * len(header))
    for label, med, worst in rows:
        print(f"{label:<18}{'median':>7}" + "".join(f"{e:>10.1e}" for e in med))
        print(f"{'':<18}{'worst':>7}" + "".join(f"{e:>10.1e}" for e in worst))


if __name__ == "__main__":
    main()

"""Per-matrix maps of AON's neighbours, for the shared engine.

Each takes one oriented ``k x N`` matrix (``k <= N``) and returns a matrix of
the same shape; all are pure and stateless.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["newton_schulz_matrix", "oni_matrix", "polar_matrix"]

# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def polar_matrix(z: Tensor) -> Tensor:
    """Exact orthonormal factor ``U V^T`` by SVD (orthogonal weight normalisation)."""
    u, _, vh = torch.linalg.svd(z, full_matrices=False)
    return u @ vh


def oni_matrix(z: Tensor, iterations: int, eps: float) -> Tensor:
    """ONI (Huang et al. 2020): Newton iterations for ``(Z Z^T)^(-1/2)``.

    ``S = Z Z^T / ||Z Z^T||_F``, ``B_0 = I``, ``B <- 1.5 B - 0.5 B^3 S``;
    returns ``B_T Z / sqrt(||Z Z^T||_F)``.
    """
    s = z @ z.mT
    norm = torch.linalg.matrix_norm(s).clamp_min(eps)
    s = s / norm
    b = torch.eye(z.shape[-2], dtype=z.dtype, device=z.device)
    for _ in range(iterations):
        b = 1.5 * b - 0.5 * (b @ b @ b @ s)
    return (b @ z) / norm.sqrt()


def newton_schulz_matrix(z: Tensor, steps: int, eps: float) -> Tensor:
    """Muon's quintic Newton-Schulz iteration towards ``U V^T`` (approximate by design:
    singular values land in roughly ``[0.7, 1.2]``, not exactly 1)."""
    a, b, c = NS_COEFFICIENTS
    x = z / torch.linalg.matrix_norm(z).clamp_min(eps)
    for _ in range(steps):
        g = x @ x.mT
        x = a * x + (b * g + c * (g @ g)) @ x
    return x

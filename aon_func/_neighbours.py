"""AON's neighbours as batched kernels over stacks of oriented matrices ``(..., k, N)``.

Each takes oriented matrices (``k <= N``) and returns the same shape; all are
pure, stateless and scale-invariant (the input is prescaled by its largest
entry, see :func:`aon_func._kernel.prescale`), map the zero matrix to zero
with a zero gradient, and keep finite values and gradients at tied singular
values. ONI and Newton-Schulz are exact under zero padding (a padded block
stays zero); the SVD polar factor is not, so the engine never pads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._kernel import call_function, prescale, vmap_innermost

__all__ = ["NS_COEFFICIENTS", "newton_schulz_matrix", "oni_matrix", "polar_matrix"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024)."""


def _cutoff(z: Tensor) -> float:
    # Singular values below this (relative to s_max >= 1 after prescaling) are rounding noise.
    return torch.finfo(z.dtype).eps * max(z.shape[-2], z.shape[-1])


def _polar_forward(z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The SVD raises on NaN or Inf entries (which the prescaling turns into NaN): it runs
    # on their zeros instead, and 0 * sum(Z), NaN for such a matrix, puts NaN in its output,
    # as the other maps propagate non-finite weights.
    u, s, vh = torch.linalg.svd(z.nan_to_num(0.0, 0.0, 0.0), full_matrices=False)
    d = s / s.clamp_min(_cutoff(z))  # 1 for every singular value above the cutoff, 0 for s = 0
    nan = z.sum(dim=(-2, -1), keepdim=True) * 0.0
    return (u * d.unsqueeze(-2)) @ vh + nan, u, s, vh


class _Polar(torch.autograd.Function):
    """``U V^T`` by SVD, with the polar factor's own derivative.

    The SVD's backward has ``1 / (s_i^2 - s_j^2)`` terms, NaN at tied singular
    values (an ``orthogonal_`` initialisation ties them all); the polar
    factor's derivative only has ``1 / (s_i + s_j)`` and, for the rows'
    complement of a wide matrix, ``1 / s_i``. With ``B = U^T G V`` for the
    output gradient ``G``, the input gradient is
    ``U [C V^T + S^-1 (U^T G - B V^T)]``, ``C = (B - B^T) / (s_i + s_j)``;
    denominators are clamped at the rounding cutoff, so a rank-deficient
    input gets a finite gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _polar_forward(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, ...]) -> None:
        _, u, s, vh = output
        ctx.mark_non_differentiable(u, s, vh)
        ctx.cutoff = _cutoff(inputs[0])
        ctx.save_for_backward(u, s, vh)
        ctx.save_for_forward(u, s, vh)

    @staticmethod
    def backward(
        ctx: Any, g: Tensor, du: Tensor | None, ds: Tensor | None, dvh: Tensor | None
    ) -> Tensor:
        u, s, vh = ctx.saved_tensors
        sc = s.clamp_min(ctx.cutoff)
        ug = u.mT @ g
        b = ug @ vh.mT
        c = (b - b.mT) / (sc.unsqueeze(-1) + sc.unsqueeze(-2))
        return u @ (c @ vh + (ug - b @ vh) / sc.unsqueeze(-1))


class _PolarFwd(_Polar):
    """:class:`_Polar` with forward-mode AD (``jvp``) for eager code."""

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        u, s, vh = ctx.saved_tensors
        sc = s.clamp_min(ctx.cutoff)
        udz = u.mT @ dz
        x = udz @ vh.mT
        m = (x - x.mT) / (sc.unsqueeze(-1) + sc.unsqueeze(-2))
        dh = u @ (m @ vh + (udz - x @ vh) / sc.unsqueeze(-1))
        if not vmap_innermost():  # see aon_func._kernel.vmap_innermost
            return dh, None, None, None
        return dh, torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)


def polar_matrix(z: Tensor) -> Tensor:
    """Exact orthonormal factor ``U V^T`` by SVD (orthogonal weight normalisation, OWN).

    Singular values at rounding level map to 0 (so the zero matrix maps to 0,
    the ``K -> inf`` limit of AON), all others to 1.
    """
    if z.numel() == 0:
        return z * 1.0
    fn = _Polar if torch.compiler.is_compiling() else _PolarFwd
    q: Tensor = call_function(fn, prescale(z))[0]
    return q


def oni_matrix(z: Tensor, iterations: int) -> Tensor:
    """ONI (Huang et al. 2020): Newton iterations for ``(Z Z^T)^(-1/2)``.

    ``S = Z Z^T / ||Z Z^T||_F``, ``B_0 = I``, ``B <- 1.5 B - 0.5 B^3 S``;
    returns ``B_T Z / sqrt(||Z Z^T||_F)`` (``Z`` prescaled first).
    """
    if z.numel() == 0:
        return z * 1.0
    zs = prescale(z)
    s = zs @ zs.mT
    norm = torch.linalg.vector_norm(s, dim=(-2, -1), keepdim=True)
    norm = torch.where(norm > 0, norm, 1.0)  # the zero matrix stays 0, with a zero gradient
    s = s / norm
    b = torch.eye(z.shape[-2], dtype=z.dtype, device=z.device).expand_as(s)
    for _ in range(iterations):
        b = 1.5 * b - 0.5 * (b @ b @ b @ s)
    return (b * norm.rsqrt()) @ zs


def newton_schulz_matrix(z: Tensor, steps: int) -> Tensor:
    """Muon's quintic Newton-Schulz iteration towards ``U V^T`` (approximate by design:
    singular values land in roughly ``[0.7, 1.2]``, not exactly 1)."""
    if z.numel() == 0:
        return z * 1.0
    a, b, c = NS_COEFFICIENTS
    zs = prescale(z)
    n = torch.linalg.vector_norm(zs, dim=(-2, -1), keepdim=True)
    x = zs / torch.where(n > 0, n, 1.0)  # the zero matrix stays 0, with a zero gradient
    for _ in range(steps):
        g = x @ x.mT
        x = a * x + (b * g + c * (g @ g)) @ x
    return x

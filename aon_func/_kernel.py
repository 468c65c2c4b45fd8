"""The AON kernel: one oriented matrix in, its approximately orthonormal image out.

Everything in this module is pure: no in-place change of inputs, no
``.item()``, no Python branching on tensor values, no randomness. It runs
under ``torch.func.vmap`` (default ``randomness='error'``), ``grad``,
grad-of-grad, ``jacrev`` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import (
    check_eps,
    check_nonneg_int,
    check_out_axis,
    check_u,
    check_weight,
    compute_dtype_for,
)
from ._layout import Layout, from_matrix, layout_of, to_matrix

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_ORDER",
    "STATELESS_POWER_ITERATIONS",
    "aon",
    "aon_matrix",
    "gram_iterate",
    "gram_power_iteration",
    "power_iteration",
    "start_vector",
    "taylor_coefficients",
    "taylor_polynomial",
]

DEFAULT_ORDER = 1
"""Default Taylor order K (see docs/results.md for the evidence behind it)."""

DEFAULT_EPS = 1e-12
"""Lower clamp of ``sigma`` and ``sigma_hat``: ``h(0) = 0`` instead of NaN."""

STATELESS_POWER_ITERATIONS = 64
"""Power iterations used when no ``u`` is given (the stateless mode).

For ``order >= 1`` they run on the ``k x k`` Gram matrix, which the kernel
forms anyway, at ``2 k^2`` FLOPs each (64 of them cost ``32 / N`` of the
forward pass). Measured by ``scripts/stateless_iterations.py`` (float32, 20
seeds): Gaussian (freshly initialised) layers are the hard case, because their
top singular values are nearly tied; there 64 iterations leave the spectral
estimate a median 3e-4 (relative) below ``s_max`` at 128 x 256 and 256 x 256,
about 2e-3 from 256 x 1024 to 1024 x 1024, and up to 2e-2 in the worst seed.
A layer whose top singular value stands 10% clear of the next converges to
float32 precision (about 1e-7). Training should carry ``u`` as state instead.
"""


def taylor_coefficients(order: int) -> tuple[float, ...]:
    """``c_j = binom(2j, j) / 4^j`` for ``j = 0..order``: the series of ``(1 - e)^(-1/2)``."""
    c = [1.0]
    for j in range(1, order + 1):
        c.append(c[-1] * (2 * j - 1) / (2 * j))
    return tuple(c)


def start_vector(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed, deterministic unit vector of length ``k`` with no zero entry.

    Used by the stateless mode. Its entries ``1 + 0.5 cos(2.39996 i)`` (golden
    angle) are all positive and irregular, so the vector is not orthogonal to
    the top singular vector of any but specially built matrices.
    """
    i = torch.arange(k, dtype=dtype, device=device)
    x = 1.0 + 0.5 * torch.cos(2.399963229728653 * i)
    return x / torch.linalg.vector_norm(x)


def _normalize(x: Tensor, eps: float) -> Tensor:
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def _normalize_or_keep(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """``x / |x|``, or ``fallback`` where ``|x|`` is tiny or not finite (zero or NaN weights)."""
    n = torch.linalg.vector_norm(x)
    ok = torch.isfinite(n) & (n > eps)
    return torch.where(ok, x / torch.where(ok, n, torch.ones_like(n)), fallback)


def power_iteration(
    z: Tensor, u: Tensor, n_iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Spectral normalisation's ``v = normalize(Z^T u); u = normalize(Z v)``, ``n_iterations`` times.

    ``u`` and ``v`` are constants for autograd. Returns ``(u, zv, sigma)`` with
    ``zv = Z v`` and ``sigma = u^T Z v``, both differentiable in ``Z``; the
    last ``Z v`` is shared between the iteration and ``sigma``. With
    ``n_iterations = 0``, ``v = normalize(Z^T u)`` and ``u`` is kept.
    """
    zd = z.detach()
    u = u.detach()
    v = _normalize(zd.mT @ u, eps)
    for _ in range(n_iterations - 1):
        u = _normalize_or_keep(zd @ v, u, eps)
        v = _normalize(zd.mT @ u, eps)
    zv = z @ v
    if n_iterations > 0:
        u = _normalize_or_keep(zv.detach(), u, eps)
    return u, zv, torch.dot(u, zv)


def gram_iterate(gram: Tensor, u: Tensor, n_iterations: int, eps: float) -> Tensor:
    """``n_iterations`` steps of ``u <- normalize(G u)`` on the ``k x k`` Gram ``G`` (constant)."""
    gd = gram.detach()
    u = u.detach()
    for _ in range(n_iterations):
        u = _normalize_or_keep(gd @ u, u, eps)
    return u


def gram_power_iteration(
    z: Tensor, gram: Tensor, u: Tensor, n_iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same iteration run on the ``k x k`` Gram ``Z Z^T`` (``u <- normalize(Z Z^T u)``).

    One step costs ``2 k^2`` instead of ``4 k N`` FLOPs, so the stateless mode
    can afford many. Then ``v = normalize(Z^T u)`` (constant) and, as in
    :func:`power_iteration`, ``(u, Z v, u^T Z v)`` is returned.
    """
    u = gram_iterate(gram, u, n_iterations, eps)
    v = _normalize(z.detach().mT @ u, eps)
    zv = z @ v
    return u, zv, torch.dot(u, zv)


def _add_to_diagonal(p: Tensor, c: float) -> Tensor:
    # ``p`` is a fresh intermediate that no autograd node has saved, so adding
    # on its diagonal in place saves materialising ``c * I``.
    p.diagonal(dim1=-2, dim2=-1).add_(c)
    return p


def taylor_polynomial(gram: Tensor, order: int, scale: Tensor | float = 1.0) -> Tensor:
    """``P_K = sum_j c_j (I - G)^j`` with ``G = scale * gram``, by Horner on the ``k x k`` side.

    ``order >= 1``. For ``K = 1``, ``P = (c_0 + c_1) I - c_1 scale gram`` is
    one pass over ``gram`` (the scale folded into the coefficient).

    ``I - G`` is never formed and every product is one fused ``addmm``. With
    ``a = c_{K-1} + c_K``, the first two Horner steps are one product,
    ``P_{K-2} = (c_{K-2} + a) I - (a + c_K) G + c_K G^2``; each further step
    is ``P <- c_j I + P - G P``. The identity terms are added on the diagonal
    of the fresh product in place. ``K - 1`` products in all (none for ``K = 1``).
    """
    c = taylor_coefficients(order)
    if order == 1:
        return _add_to_diagonal(gram * (scale * -c[1]), c[0] + c[1])
    g = gram * scale
    a = c[order - 1] + c[order]
    p = torch.addmm(g, g, g, beta=-(a + c[order]), alpha=c[order])
    p = _add_to_diagonal(p, c[order - 2] + a)
    for j in range(order - 3, -1, -1):
        p = _add_to_diagonal(torch.addmm(p, g, p, alpha=-1.0), c[j])
    return p


def _prescale(z: Tensor) -> Tensor:
    """``Z / max_ij |Z_ij|``, a constant scale: no overflow or underflow in ``Z Z^T`` and the norms.

    ``h`` is scale-invariant (with ``u, v`` held fixed too), so this changes
    neither ``h`` nor its derivatives, and makes ``h(c W) = h(W)`` hold for
    every finite weight, not only for those with ``s_max`` between about
    ``1e-6`` (below which ``|Z Z^T u|`` falls under ``eps``) and ``1e9`` (above
    which its square overflows float32). Zero and non-finite weights are left
    as they are, so ``eps`` and the NaN policy act as before.
    """
    if z.shape[-2] == 0 or z.shape[-1] == 0:
        return z
    a = torch.amax(z.detach().abs())
    return z / torch.where(torch.isfinite(a) & (a > 0), a, torch.ones_like(a))


def _gram_and_zv(z: Tensor, u: Tensor, n_iterations: int, eps: float) -> tuple[Tensor, ...]:
    """``(G, Z v, u, |Z^T u|)`` from ``G = Z Z^T`` alone: no pass over ``Z`` but the product.

    ``u`` runs ``n_iterations`` steps on ``G`` (as :func:`gram_power_iteration`),
    then ``v = Z^T u / |Z^T u|``, so ``Z v = G u / |Z^T u|`` and
    ``|Z^T u| = sqrt(u^T G u)``: ``k x k`` matrix-vector products instead of
    two passes over the ``k x N`` matrix.
    """
    gram = z @ z.mT
    u = gram_iterate(gram, u, n_iterations, eps)
    u = u.clone() if n_iterations == 0 else u  # an output, never the input itself
    gu = gram @ u
    n = torch.dot(u, gu).clamp_min(0.0).sqrt().clamp_min(eps)
    return gram, gu / n, u, n


class _GramZv(torch.autograd.Function):
    """``(Z Z^T, Z v)`` with ``v = normalize(Z^T u)`` constant, and one backward product.

    Autograd through ``z @ z.mT`` and ``z @ v`` would run two ``k x k @ k x N``
    products, an outer product ``dzv v^T`` and two ``k x N`` sums. Since
    ``v = Z^T u / n``, ``dzv v^T = (dzv u^T / n) Z``, so the whole gradient
    is one product ``(dG + dG^T + dzv u^T / n) Z``. ``u`` and ``n`` are
    constants for autograd (the power iteration's), ``Z`` is saved, so the
    backward is differentiable (grad-of-grad); ``jvp`` serves forward mode
    and ``vmap`` uses the generated rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, u: Tensor, n_iterations: int, eps: float) -> tuple[Tensor, ...]:
        return _gram_and_zv(z, u, n_iterations, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        z = inputs[0]
        _, _, u, n = output
        ctx.mark_non_differentiable(u, n)
        ctx.save_for_backward(z, u, n)
        ctx.save_for_forward(z, u, n)

    @staticmethod
    def backward(
        ctx: Any, dg: Tensor, dzv: Tensor, du: Tensor | None, dn: Tensor | None
    ) -> tuple[Tensor, None, None, None]:
        z, u, n = ctx.saved_tensors
        grad: Tensor = _GramZvGrad.apply(dg, dzv, z, u / n)  # type: ignore[no-untyped-call]
        return grad, None, None, None

    @staticmethod
    def jvp(
        ctx: Any, dz: Tensor, du: Tensor | None, d_iter: None, d_eps: None
    ) -> tuple[Tensor, Tensor, None, None]:
        z, u, n = ctx.saved_tensors
        a = dz @ z.mT
        return a + a.mT, dz @ ((z.mT @ u) / n), None, None


class _GramZvGrad(torch.autograd.Function):
    """``_GramZv``'s gradient ``(dG + dG^T + dzv w^T) Z`` (``w = u / n``) in one product.

    Its own derivative keeps ``v = Z^T w`` constant, as the forward does: in
    ``Z``, only the ``(dG + dG^T) Z`` part varies. The ops below are
    differentiable, so higher orders work too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dg: Tensor, dzv: Tensor, z: Tensor, w: Tensor) -> Tensor:
        return (dg + dg.mT + torch.outer(dzv, w)) @ z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        dg, _, z, w = inputs
        ctx.save_for_backward(dg, z, w)
        ctx.save_for_forward(dg, z, w)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        dg, z, w = ctx.saved_tensors
        a = dout @ z.mT
        return a + a.mT, a @ w, (dg + dg.mT) @ dout, None

    @staticmethod
    def jvp(ctx: Any, ddg: Tensor, ddzv: Tensor, dz: Tensor, dw: Tensor | None) -> Tensor:
        dg, z, w = ctx.saved_tensors
        return (ddg + ddg.mT + torch.outer(ddzv, w)) @ z + (dg + dg.mT) @ dz


def aon_matrix(
    z: Tensor,
    u: Tensor,
    *,
    order: int,
    n_power_iterations: int,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """AON of one oriented ``k x N`` matrix (``k <= N``), in its own dtype.

    Returns ``(h, u_new)``. No validation: callers check at the boundary.
    Cost: ``2 k^2 N`` (Gram) ``+ 2 (K-1) k^3`` (Horner) ``+ 2 k^2 N``
    (product) ``+ 2 k^2`` per power iteration ``+ 4 k^2``; the power
    iteration and ``Z v`` run on the Gram (no pass over ``Z``), and the
    backward is ``2K + 1`` products of those sizes (see ``_GramZv``).
    """
    z = _prescale(z)
    if order == 0:
        u_new, zv, sigma = power_iteration(z, u, n_power_iterations, eps)
        return z / sigma.clamp_min(eps), u_new
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp: compiled
        # code takes plain autograd (same values up to rounding).
        gram = z @ z.mT
        u_new, zv, sigma = gram_power_iteration(z, gram, u, n_power_iterations, eps)
    else:
        gram, zv, u_new, _ = _GramZv.apply(  # type: ignore[no-untyped-call]
            z, u.detach(), n_power_iterations, eps
        )
        sigma = torch.dot(u_new, zv)
    inv_sigma = 1.0 / sigma.clamp_min(eps)
    p = taylor_polynomial(gram, order, inv_sigma * inv_sigma)
    # What = P Zb = P Z / sigma; sigma_hat = u^T What v = u^T P (Z v) / sigma.
    sigma_hat = (torch.dot(u_new, p @ zv) * inv_sigma).clamp_min(eps)
    # Scale the k x k factor, not the k x N product.
    return (p * (inv_sigma / sigma_hat)) @ z, u_new


def aon(
    weight: Tensor,
    u: Tensor | None = None,
    *,
    order: int = DEFAULT_ORDER,
    n_power_iterations: int = 1,
    out_axis: int = 0,
    training: bool = True,
    eps: float = DEFAULT_EPS,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Approximated orthonormal normalisation of one weight tensor.

    .. math::  h(W) = \mathrm{SN}\big(P_K(Z_b Z_b^\top)\, Z_b\big),\quad
               Z_b = Z / \sigma,\quad P_K(S) = \sum_{j=0}^{K} c_j (I - S)^j

    ``Z`` is the matrix view of ``weight`` around ``out_axis`` (transposed when
    tall), ``sigma`` its spectral estimate by power iteration and ``c_j`` the
    Taylor coefficients of ``(1 - e)^{-1/2}``. Each singular value ``s`` of
    ``Z / s_max`` maps to ``f_K(s) = s * sum_j c_j (1 - s^2)^j`` (see
    :func:`singular_value_map`), so the largest becomes 1 and the others move
    towards 1: ``f_1(0.5) = 0.69``, ``f_4(0.5) = 0.90``, ``f_16(0.5) = 0.998``.
    The orthogonality error ``||h h^T - I||_2`` is ``1 - f_K(1/kappa)^2`` for
    a weight of condition number ``kappa`` (:func:`certified_error`).

    Args:
        weight: floating tensor of shape ``(..., d_out, ...)`` with ``ndim >= 2``.
        u: power-iteration state, shape ``(k,)`` with ``k = min(rows, cols)``
            of the matrix view, in the compute dtype. ``None`` is the
            stateless mode: start from a fixed vector and run
            ``max(n_power_iterations, STATELESS_POWER_ITERATIONS)`` iterations.
        order: Taylor order ``K >= 0``; ``0`` is spectral normalisation.
        n_power_iterations: power-iteration steps (``0`` only with a given ``u``).
        out_axis: the output (neuron) axis: 0 for Linear/Conv, 1 for ConvTranspose.
        training: when ``False`` the given ``u`` is returned unchanged.
        eps: lower clamp of the spectral estimates (``h(0) = 0``).
        compute_dtype: dtype of the computation; default float32 for
            float16/bfloat16 weights and the weight's dtype otherwise.

    Returns:
        ``(h, u_new)``: ``h`` has ``weight``'s shape and dtype; ``u_new`` is the
        advanced state (the converged vector in the stateless mode).

    Non-finite weights propagate to ``h`` (as torch's own ops do), while
    ``u_new`` keeps the previous ``u``, so a NaN step does not poison the state.

    Example:
        >>> import torch, aon_func
        >>> w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
        >>> h, u = aon_func.aon(w, order=4)
        >>> s = torch.linalg.svdvals(h)
        >>> s_w = torch.linalg.svdvals(w)
        >>> round(s.max().item(), 4), round(s_w.min().item() / s_w.max().item(), 2), round(s.min().item(), 2)
        (1.0, 0.17, 0.41)
        >>> torch.allclose(s, aon_func.singular_value_map(s_w / s_w.max(), 4), atol=1e-4)
        True
        >>> h2, u2 = aon_func.aon(w, u, order=4)  # stateful: one more iteration
    """
    weight = check_weight(weight)
    order = check_nonneg_int(order, "order")
    n_power_iterations = check_nonneg_int(n_power_iterations, "n_power_iterations")
    eps = check_eps(eps)
    axis = check_out_axis(out_axis, weight)
    layout = layout_of(weight.shape, axis)
    cdtype = compute_dtype_for(weight.dtype, compute_dtype)
    k = layout.matrix_shape[0]
    if u is None:
        if n_power_iterations == 0:
            raise ValueError(
                "n_power_iterations=0 needs a given u (the stateless mode u=None must iterate); "
                f"got u=None for weight with shape={tuple(weight.shape)}"
            )
        u0 = start_vector(k, cdtype, weight.device)
        iterations = max(n_power_iterations, STATELESS_POWER_ITERATIONS)
    else:
        u0 = check_u(u, k, cdtype, weight.device)
        iterations = n_power_iterations
    h, u_new = aon_tensor(weight, u0, layout, order, iterations, eps, cdtype)
    if u is not None and not training:
        u_new = u
    return h, u_new


def aon_tensor(
    weight: Tensor,
    u: Tensor,
    layout: Layout,
    order: int,
    n_power_iterations: int,
    eps: float,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Unchecked tensor-level kernel: matrix view, cast, AON, back."""
    z = to_matrix(weight, layout).to(compute_dtype)
    h, u_new = aon_matrix(z, u, order=order, n_power_iterations=n_power_iterations, eps=eps)
    return from_matrix(h, layout).to(weight.dtype), u_new

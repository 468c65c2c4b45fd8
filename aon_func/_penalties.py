"""Orthonormal regularisation: the penalties that AON turns into a normalisation.

Both penalties see a weight through the same matrix view as :func:`aon_func.aon`
(output axis first, the rest flattened, tall matrices transposed), so they
push the rows of a wide weight, or the columns of a tall one, towards
orthonormality. Both are pure (no in-place change of inputs, no ``.item()``,
no branching on tensor values) and run under ``torch.func.grad`` and
``torch.func.vmap``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_eps, check_nonneg_int, check_out_axis, check_u, check_weight
from ._checks import compute_dtype_for as _compute_dtype_for
from ._kernel import (
    DEFAULT_EPS,
    STATELESS_POWER_ITERATIONS,
    power_iterate,
    repair_state,
    start_vector,
)
from ._layout import layout_of, to_matrix

__all__ = ["soft_orthogonality_penalty", "srip_penalty"]


def _gram_minus_identity(weight: Tensor, out_axis: int) -> Tensor:
    layout = layout_of(weight.shape, out_axis)
    z = to_matrix(weight, layout).to(_compute_dtype_for(weight.dtype))
    eye = torch.eye(z.shape[-2], dtype=z.dtype, device=z.device)
    return z @ z.mT - eye


def soft_orthogonality_penalty(weight: Tensor, *, out_axis: int = 0) -> Tensor:
    r"""Soft orthogonality: ``||Z Z^T - I||_F^2`` on the short side of the matrix view.

    .. math:: R(W) = \lVert Z Z^\top - I \rVert_F^2

    The square of :func:`aon_func.orthogonality_error`. Training adds
    ``lambda * sum_layers R(W)`` to the loss; ``lambda`` must be balanced by
    hand against the data term, which is the point AON's normalisation removes
    (see ``docs/results.md`` for the sweep).

    Args:
        weight: floating tensor with ``ndim >= 2``.
        out_axis: the output (neuron) axis: 0 for Linear/Conv, 1 for ConvTranspose.

    Returns:
        A 0-d tensor in the compute dtype (float32 for float16/bfloat16 input),
        differentiable in ``weight``.

    Example:
        >>> import torch, aon_func
        >>> float(aon_func.soft_orthogonality_penalty(torch.eye(3)))
        0.0
        >>> float(aon_func.soft_orthogonality_penalty(2 * torch.eye(3)))  # 3 * (4 - 1)^2
        27.0
    """
    weight = check_weight(weight)
    axis = check_out_axis(out_axis, weight)
    a = _gram_minus_identity(weight, axis)
    return (a * a).sum()


def srip_penalty(
    weight: Tensor,
    u: Tensor | None = None,
    *,
    n_power_iterations: int = 1,
    out_axis: int = 0,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    r"""SRIP (Bansal et al. 2018): ``sigma_max(Z Z^T - I)^2`` by power iteration.

    .. math:: R(W) = \sigma_{\max}\big(Z Z^\top - I\big)^2

    ``A = Z Z^T - I`` is symmetric (``k x k``, ``k`` the short side), so its
    largest singular value is its largest ``|eigenvalue|``,
    ``max_i |s_i^2 - 1|`` over the singular values ``s_i`` of ``W``. The
    estimate is ``||A u||`` after ``u <- normalize(A u)`` steps; ``u`` is a
    constant for autograd and is returned as state, as in spectral
    normalisation, so one step per training step tracks the top direction.
    The estimate is a lower bound of ``sigma_max`` that is exact once ``u`` has
    converged.

    Args:
        weight: floating tensor with ``ndim >= 2``.
        u: state, shape ``(k,)`` in the compute dtype. ``None`` starts from a
            fixed vector and runs ``max(n_power_iterations, 64)`` iterations
            (the stateless mode; its ``u_new`` is a good initial state). A
            zero or non-finite ``u`` is replaced by that fixed vector.
        n_power_iterations: power-iteration steps (``0`` only with a given ``u``).
        out_axis: the output (neuron) axis: 0 for Linear/Conv, 1 for ConvTranspose.
        eps: accepted for symmetry with :func:`aon_func.aon`, in ``(0, 1e-3]``;
            the shared power iteration keeps the previous ``u`` wherever the
            iterate vanishes or is not finite.

    Returns:
        ``(penalty, u_new)``: a 0-d tensor differentiable in ``weight``, and
        the advanced state.

    Example:
        >>> import torch, aon_func
        >>> w = torch.diag(torch.tensor([2.0, 1.0, 0.5]))
        >>> p, u = aon_func.srip_penalty(w)  # max |s^2 - 1| = 3
        >>> round(float(p), 4)
        9.0
        >>> p, u = aon_func.srip_penalty(w, u)  # stateful: one more step
    """
    weight = check_weight(weight)
    axis = check_out_axis(out_axis, weight)
    n_power_iterations = check_nonneg_int(n_power_iterations, "n_power_iterations")
    eps = check_eps(eps)
    a = _gram_minus_identity(weight, axis)
    k = a.shape[-1]
    if u is None:
        if n_power_iterations == 0:
            raise ValueError(
                "n_power_iterations=0 needs a given u (the stateless mode u=None must iterate); "
                f"got u=None for weight with shape={tuple(weight.shape)}"
            )
        u0 = start_vector(k, a.dtype, a.device)
        iterations = max(n_power_iterations, STATELESS_POWER_ITERATIONS)
    else:
        u0 = check_u(u, k, a.dtype, weight.device).detach()
        iterations = n_power_iterations
    start = repair_state(u0.unsqueeze(-1), start_vector(k, a.dtype, a.device).unsqueeze(-1))
    u1 = power_iterate(a.detach(), start, iterations).squeeze(-1)
    au = a @ u1
    return torch.dot(au, au), u1

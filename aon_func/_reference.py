"""Closed forms and exact references that AON is tested and measured against."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_nonneg_int, check_out_axis, check_weight, compute_dtype_for
from ._kernel import taylor_coefficients
from ._layout import from_matrix, layout_of, to_matrix
from ._neighbours import polar_matrix

__all__ = ["certified_error", "orthogonality_error", "polar", "singular_value_map"]


def singular_value_map(s: Tensor | float, order: int) -> Tensor | float:
    r"""The closed form ``f_K`` of what AON does to each normalised singular value.

    .. math:: f_K(s) = s \sum_{j=0}^{K} c_j (1 - s^2)^j,\qquad c_j = \binom{2j}{j} / 4^j

    For ``s`` in ``[0, 1]`` (singular values divided by the largest),
    ``f_K(1) = 1``, ``f_K`` is increasing and ``f_K(s) -> 1`` as ``K`` grows
    (slowly for small ``s``: about ``2 s sqrt(K / pi)``).

    Args:
        s: singular value(s) divided by the largest; a float or a tensor.
        order: Taylor order ``K >= 0``.

    Returns:
        ``f_K(s)``, of the same kind (float or tensor) as ``s``.

    Example:
        >>> import aon_func
        >>> round(aon_func.singular_value_map(0.5, 1), 4), round(aon_func.singular_value_map(0.5, 4), 4)
        (0.6875, 0.9021)
    """
    order = check_nonneg_int(order, "order")
    c = taylor_coefficients(order)
    e = 1 - s * s
    acc: Tensor | float = c[order]
    for j in range(order - 1, -1, -1):
        acc = c[j] + e * acc
    return s * acc


def certified_error(kappa: Tensor | float, order: int) -> Tensor | float:
    r"""``||h h^T - I||_2 = 1 - f_K(1 / kappa)^2`` for a weight of condition number ``kappa``.

    Exact once the power iteration has converged (``kappa`` is the condition
    number of the short side of the matrix view).

    Example:
        >>> import aon_func
        >>> round(aon_func.certified_error(2.0, 16), 5)
        0.0038
    """
    if isinstance(kappa, Tensor):
        if not kappa.dtype.is_floating_point:
            raise TypeError(f"kappa must be floating, got dtype={kappa.dtype}")
        # A reference function, not a kernel: checking values here is fine.
        if not bool((kappa >= 1.0).all()):
            raise ValueError(
                f"kappa must be >= 1 (condition numbers), got a tensor with minimum {float(kappa.min())}"
            )
        f = singular_value_map(1.0 / kappa, order)
    else:
        if not kappa >= 1.0:
            raise ValueError(f"kappa must be >= 1 (a condition number), got {kappa}")
        f = singular_value_map(1.0 / float(kappa), order)
    return 1 - f * f


def polar(weight: Tensor, out_axis: int = 0) -> Tensor:
    r"""The exact orthonormal factor ``U V^T`` of the matrix view, by SVD.

    The limit of AON as ``K -> inf`` and the map of orthogonal weight
    normalisation (OWN), the same function as :class:`aon_func.Polar`
    (singular values at rounding level map to 0). Same orientation rules as :func:`aon` (tall matrices
    get orthonormal columns); computed in float32 for half-precision input.

    Example:
        >>> import torch, aon_func
        >>> q = aon_func.polar(torch.randn(3, 5))
        >>> torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)
        True
    """
    weight = check_weight(weight)
    layout = layout_of(weight.shape, check_out_axis(out_axis, weight))
    z = to_matrix(weight, layout).to(compute_dtype_for(weight.dtype))
    return from_matrix(polar_matrix(z), layout).to(weight.dtype)


def orthogonality_error(weight: Tensor, out_axis: int = 0) -> Tensor:
    r"""``||Z Z^T - I||_F`` on the short side of the matrix view (a 0-d tensor).

    Zero exactly when the rows (wide) or columns (tall) of the matrix view
    are orthonormal.

    Example:
        >>> import torch, aon_func
        >>> float(aon_func.orthogonality_error(torch.eye(4)))
        0.0
    """
    weight = check_weight(weight)
    layout = layout_of(weight.shape, check_out_axis(out_axis, weight))
    z = to_matrix(weight, layout).to(compute_dtype_for(weight.dtype))
    eye = torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    return torch.linalg.matrix_norm(z @ z.mT - eye)

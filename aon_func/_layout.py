"""The matrix view of a weight tensor, and its inverse.

A weight of shape ``(d_out, *rest)`` (output axis ``out_axis``) is viewed as
an ``m x n`` matrix ``M`` with ``m = d_out`` and ``n = prod(rest)``. Tall
matrices (``m > n``) are transposed, so the kernels always see a *wide*
``k x N`` matrix ``Z`` with ``k = min(m, n) <= N``: for a tall weight the
columns are made orthonormal instead of the rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Layout", "from_matrix", "layout_of", "to_matrix"]


class Layout(NamedTuple):
    """Static description of how a weight maps to its oriented matrix ``Z``."""

    shape: tuple[int, ...]
    out_axis: int
    transposed: bool

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(k, N)``: the oriented (wide) matrix shape."""
        m = self.shape[self.out_axis]
        n = 1
        for i, d in enumerate(self.shape):
            if i != self.out_axis:
                n *= d
        return (n, m) if self.transposed else (m, n)


def layout_of(shape: tuple[int, ...] | torch.Size, out_axis: int) -> Layout:
    """The layout of a weight of ``shape`` whose output axis is ``out_axis`` (normalised)."""
    shape = tuple(int(d) for d in shape)
    m = shape[out_axis]
    n = 1
    for i, d in enumerate(shape):
        if i != out_axis:
            n *= d
    return Layout(shape, out_axis, m > n)


def to_matrix(weight: Tensor, layout: Layout) -> Tensor:
    """``weight`` -> oriented ``k x N`` matrix (a view where possible)."""
    k, n = layout.matrix_shape
    # Explicit sizes, not ``-1``: a weight with a zero-length axis has no inferable size.
    z = torch.movedim(weight, layout.out_axis, 0).reshape((n, k) if layout.transposed else (k, n))
    return z.mT if layout.transposed else z


def from_matrix(z: Tensor, layout: Layout) -> Tensor:
    """Inverse of :func:`to_matrix`."""
    if layout.transposed:
        z = z.mT
    moved = (
        layout.shape[layout.out_axis],
        *tuple(d for i, d in enumerate(layout.shape) if i != layout.out_axis),
    )
    return torch.movedim(z.reshape(moved), 0, layout.out_axis)

"""Per-tensor AON in torch's style: ``aon_norm(module, "weight")``, as ``spectral_norm``.

For code written around ``torch.nn.utils.parametrizations.spectral_norm``:
:func:`aon_norm` registers AON on one tensor of one module with
``torch.nn.utils.parametrize``, with the same conventions (``dim``, train and
eval modes, assignment through ``right_inverse``). It runs the same kernel
as :func:`aon_func.aon` and the same parametrization as
:func:`aon_func.parametrize` (:class:`~aon_func._parametrize.WeightParametrization`),
which normalises a whole model at once and handles tied weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from ._checks import check_out_axis, check_weight
from ._kernel import DEFAULT_EPS, DEFAULT_ORDER
from ._parametrize import WeightParametrization
from ._transform import AON

__all__ = ["aon_norm"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def aon_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    order: int = DEFAULT_ORDER,
    n_power_iterations: int = 1,
    eps: float = DEFAULT_EPS,
    dim: int | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Apply AON to the tensor ``name`` of ``module``: ``module.<name>`` reads ``h(W)``.

    ``h`` is the AON map of :func:`aon_func.aon` (order ``K``; ``order=0`` is
    spectral normalisation): the largest singular value of the weight's
    matrix view becomes 1 and the others are pushed towards 1 by
    ``f_K(s) = s * sum_j c_j (1 - s^2)^j``. As with
    ``torch.nn.utils.parametrizations.spectral_norm``:

    - the weight is viewed as a matrix around the output axis ``dim``
      (``None``: 1 for ``ConvTranspose1d/2d/3d``, 0 otherwise);
    - the power-iteration vector is the buffer
      ``module.parametrizations.<name>[0].u`` (length ``min(m, n)`` of the
      matrix view; it is not torch's ``_u``, and torch's state dicts do not
      load into it). It advances at every read of the weight in training
      mode and is left alone in eval mode, and it is in ``state_dict``, so a
      state dict loads into a fresh module built the same way;
    - ``module.<name> = W`` stores ``W`` as the raw weight
      (``module.parametrizations.<name>.original``); reading gives ``h(W)``;
    - ``torch.nn.utils.parametrize.remove_parametrizations(module, name)``
      removes it (and bakes ``h(W)`` in), as does :func:`aon_func.remove_parametrizations`.

    The vector starts as :meth:`aon_func.AON.init` draws it (from
    ``generator``, warmed up by 64 power iterations). ``aon_norm`` sees only
    ``module``: a tensor tied to another module's (a language model's head and
    embedding) is normalised here only; use :func:`aon_func.parametrize` on
    the whole model for tied weights.

    Args:
        module: the module holding the tensor; changed in place and returned.
        name: the tensor's name, floating, with ``ndim >= 2``.
        order: Taylor order ``K >= 0``.
        n_power_iterations: power-iteration steps per read in training mode
            (for ``order >= 1`` at least ``SAFEGUARD_ITERATIONS`` run on the
            Gram matrix, see :func:`aon_func.aon`).
        eps: numerical floor, in ``(0, 1e-3]``.
        dim: the output axis; ``None`` picks as torch does.
        generator: for the initial vector.

    Returns:
        ``module``.

    Example:
        >>> import torch, aon_func.nn
        >>> layer = aon_func.nn.aon_norm(torch.nn.Linear(20, 40), order=2)
        >>> round(float(torch.linalg.matrix_norm(layer.weight, ord=2)), 3)
        1.0
        >>> layer.weight = torch.randn(40, 20)  # sets the raw weight
        >>> raw = layer.parametrizations.weight.original
        >>> torch.equal(layer.eval().weight, layer.weight), torch.equal(layer.weight, raw)
        (True, False)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"aon_norm: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"aon_norm: name must be a str, got {type(name).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"aon_norm: {type(module).__name__} has no parameter or buffer named {name!r}"
        )
    where = f"{type(module).__name__}.{name}"
    check_weight(weight, where)
    if torch_parametrize.is_parametrized(module, name) and any(
        isinstance(p, WeightParametrization)
        for p in module.parametrizations[name]  # type: ignore[index]
    ):
        raise ValueError(f"aon_norm: {where} is already normalised by aon_func")
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    axis = check_out_axis(dim, weight, f"{where} (dim)")
    transform = AON(
        order=order,
        n_power_iterations=n_power_iterations,
        eps=eps,
        include=frozenset({name}),
        out_axes={name: axis},
    )
    u = transform.init({name: weight.detach()}, generator=generator)[name]
    p = WeightParametrization(transform, out_axis=axis, u=u, gain=None, like=weight)
    torch_parametrize.register_parametrization(module, name, p)
    if p.u is not None:  # registration ran forward (shape checks): put u back
        with torch.no_grad():
            p.u.copy_(u)
    return module

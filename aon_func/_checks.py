"""Boundary validation shared by the kernel, the transforms and the adapter.

Every check here looks only at Python values and tensor metadata (shape,
dtype, device), never at tensor values, so it is safe to run under
``torch.func.vmap``, ``torch.func.grad`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "EPS_MAX",
    "check_bool",
    "check_eps",
    "check_gain",
    "check_generator",
    "check_nonneg_int",
    "check_out_axis",
    "check_u",
    "check_weight",
    "compute_dtype_for",
    "describe",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def describe(t: Tensor) -> str:
    """``shape=(3, 4), dtype=torch.float32, device=cpu`` for error messages."""
    return f"shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}"


def check_weight(weight: object, name: str = "weight") -> Tensor:
    """A real floating tensor with ``ndim >= 2``, else ``TypeError``/``ValueError``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {describe(weight)}"
        )
    if weight.ndim < 2:
        raise ValueError(
            f"{name} must have ndim >= 2 (output axis plus at least one input axis), "
            f"got {describe(weight)}"
        )
    return weight


def check_nonneg_int(value: object, name: str) -> int:
    """A Python ``int`` (not ``bool``) that is ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})"
        )
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return int(value)


EPS_MAX = 1e-3
"""Largest accepted ``eps``: the kernels prescale every matrix so that ``s_max >= 1``."""


def check_eps(eps: object) -> float:
    """A Python number in ``(0, EPS_MAX]``."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {eps!r} ({type(eps).__name__})")
    if not (0.0 < float(eps) <= EPS_MAX):
        raise ValueError(
            f"eps must be a positive float in (0, {EPS_MAX:g}] (a numerical floor: the kernels "
            f"prescale each matrix to s_max >= 1, so a larger eps would change the result), got {eps}"
        )
    return float(eps)


def check_bool(value: object, name: str) -> bool:
    """A Python ``bool`` (``1`` and ``"no"`` are refused, not read as truth values)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_gain(value: object, name: str, *, optional: bool = False) -> float:
    """A finite, positive Python number (a fixed gain, or a learnable gain's initial value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "a positive float or None" if optional else "a positive float"
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_generator(value: object) -> torch.Generator | None:
    """``None`` or a ``torch.Generator``, else ``TypeError``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {value!r} ({type(value).__name__})"
        )
    return value


def check_out_axis(out_axis: object, weight: Tensor, name: str = "weight") -> int:
    """Normalise ``out_axis`` to ``0 <= out_axis < weight.ndim``."""
    if isinstance(out_axis, bool) or not isinstance(out_axis, numbers.Integral):
        raise TypeError(f"out_axis must be an int, got {out_axis!r} ({type(out_axis).__name__})")
    nd = weight.ndim
    if not -nd <= int(out_axis) < nd:
        raise ValueError(
            f"out_axis={out_axis} is out of range for {name} with {describe(weight)}: "
            f"expected {-nd} <= out_axis < {nd}"
        )
    return int(out_axis) % nd


def compute_dtype_for(dtype: torch.dtype, override: torch.dtype | None = None) -> torch.dtype:
    """float16/bfloat16 are computed in float32; other dtypes in themselves.

    An ``override`` must be a floating dtype other than float16, whose range is
    too narrow for the kernel: the ``eps`` clamp (1e-12) underflows to 0 and
    ``1 / eps`` overflows, so a zero weight would give NaN.
    """
    if override is not None:
        if not isinstance(override, torch.dtype) or not override.is_floating_point:
            raise TypeError(
                f"compute_dtype must be a floating torch.dtype or None, got {override!r}"
            )
        if override == torch.float16:
            raise TypeError(
                "compute_dtype=torch.float16 is not supported (its range is too narrow for the "
                "eps clamp and the Gram products); use torch.float32 (the default for float16 "
                "weights) or torch.bfloat16"
            )
        return override
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def check_u(
    u: object,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "u",
    weight: str = "the weight",
    optional: bool = True,
) -> Tensor:
    """``u`` must be a 1-D tensor of length ``k`` in the compute dtype, on the weight's device.

    ``name`` and ``weight`` say in the message which ``u`` and which weight
    (e.g. ``state['fc.weight']`` and ``params['fc.weight'] with shape=...``);
    ``optional`` says whether ``None`` was an alternative (the kernel's ``u``).
    """
    if not isinstance(u, Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(u).__name__}")
    if u.ndim != 1 or u.shape[0] != k:
        raise ValueError(
            f"{name} must have shape ({k},) (k = min(rows, cols) of the matrix view of {weight}), "
            f"got {describe(u)}"
        )
    if u.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (the compute dtype of {weight}), got {describe(u)}"
        )
    if u.device != device:
        raise ValueError(f"{name} must be on device {device} like {weight}, got {describe(u)}")
    return u

"""Which tensors a transform normalises: ``include`` rules, and the linear maps of a module."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["FrozenDict", "Include", "module_weights", "normalise_include", "selects"]

Include = str | re.Pattern[str] | Callable[[str, Tensor], bool] | Collection[str] | None
"""Which tensors to normalise: a regular expression (a string or a compiled
pattern, ``search``-ed in the name), a predicate ``(name, tensor) -> bool``, a
collection of names, or ``None`` for the default (floating, ``ndim >= 2``,
name ending in ``weight``)."""


class FrozenDict(Mapping[str, int]):
    """A read-only, hashable, picklable mapping (a transform's ``out_axes``)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, int] | None = None) -> None:
        self._d: dict[str, int] = dict(items or {})

    def __getitem__(self, key: str) -> int:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._d) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._d)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (self._d,))


def normalise_include(include: object) -> Include:
    """Check ``include`` and freeze a collection of names (so transforms stay hashable)."""
    if include is None or isinstance(include, (str, re.Pattern)) or callable(include):
        return include
    if not isinstance(include, Collection):
        raise TypeError(
            "include must be None, a regular expression, a predicate (name, tensor) -> bool "
            f"or a collection of names, got {type(include).__name__}"
        )
    names = frozenset(include)
    bad = sorted(repr(n) for n in names if not isinstance(n, str))
    if bad:
        raise TypeError(f"include names must be strings, got {', '.join(bad)}")
    return names


def _default(name: str, tensor: Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.ndim >= 2 and name.endswith("weight")


def selects(include: Include, name: str, tensor: Tensor) -> bool:
    """Whether ``include`` picks ``params[name]``."""
    if include is None:
        return _default(name, tensor)
    if isinstance(include, str):
        return re.search(include, name) is not None
    if isinstance(include, re.Pattern):
        return include.search(name) is not None
    if callable(include):
        return bool(include(name, tensor))
    return name in include


def module_weights(module: nn.Module) -> dict[str, int]:
    """The weights of ``module``'s linear maps, with their output axes.

    ``Linear`` and ``Conv1d/2d/3d`` (axis 0), ``ConvTranspose1d/2d/3d``
    (axis 1), and the input projections of ``MultiheadAttention``.
    """
    names: dict[str, int] = {}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names[dot + "weight"] = 0
        elif isinstance(sub, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            names[dot + "weight"] = 1
        elif isinstance(sub, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(sub, pname, None) is not None:
                    names[dot + pname] = 0
    return names

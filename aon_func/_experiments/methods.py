"""The methods of the comparison, by name, and how each is built from the public API.

Names (``--methods`` / ``--method``):

- ``plain``: no normalisation, no penalty.
- ``sn``: spectral normalisation, ``aon_func.AON(order=0)``.
- ``aon``: ``aon_func.AON()`` at the library's default order
  (``aon_func.DEFAULT_ORDER``); ``aon-K``: ``aon_func.AON(order=K)``.
- ``oni`` / ``oni-T``: ``aon_func.ONI(iterations=T)`` (default 5).
- ``ns`` / ``ns-T``: ``aon_func.NewtonSchulz(steps=T)`` (default 5).
- ``polar``: ``aon_func.Polar()``, the exact ``U V^T`` (OWN).
- ``soft`` / ``soft:LAMBDA``: cross-entropy plus
  ``LAMBDA * sum ||W W^T - I||_F^2`` (:func:`aon_func.soft_orthogonality_penalty`).
- ``srip`` / ``srip:LAMBDA``: cross-entropy plus
  ``LAMBDA * sum sigma_max(W W^T - I)^2`` (:func:`aon_func.srip_penalty`, one
  power-iteration step per training step, its vector carried as state).

The normalising methods (``sn``, ``aon*``, ``oni*``, ``ns*``, ``polar``) all
transform the same layers with the same gain (:class:`Scale`); the penalties
act on the same layers; ``plain`` leaves them alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Literal

from torch import nn

from .. import AON, DEFAULT_ORDER, ONI, NewtonSchulz, Polar, WeightTransform
from .models import HEAD_WEIGHT

__all__ = [
    "DEFAULT_LAMBDAS",
    "METHOD_NAMES",
    "Method",
    "Scale",
    "make_transform",
    "parse_method",
    "parse_methods",
    "selected_layers",
]

DEFAULT_LAMBDAS = {"soft": 1e-3, "srip": 1e-3}
"""Penalty weights of ``soft`` and ``srip`` without ``:LAMBDA``: the best of
the sweep on the MNIST-1D MLP (docs/results.md); the best weight differs on
the other models, which is the point of the comparison."""

Kind = Literal["plain", "normalise", "penalty"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison, parsed from its name."""

    name: str
    kind: Kind
    family: str
    order: int = 0
    iterations: int = 0
    lam: float = 0.0

    @property
    def label(self) -> str:
        """A human description, e.g. ``AON K=2`` or ``soft orth. lambda=0.001``."""
        if self.family == "aon":
            return "SN (AON K=0)" if self.order == 0 else f"AON K={self.order}"
        if self.family in ("oni", "ns"):
            return f"{'ONI' if self.family == 'oni' else 'Newton-Schulz'} T={self.iterations}"
        if self.family == "polar":
            return "polar U V^T (OWN)"
        if self.family == "soft":
            return f"soft orth. lambda={self.lam:g}"
        if self.family == "srip":
            return f"SRIP lambda={self.lam:g}"
        return "plain"


_PATTERN = re.compile(
    r"^(?:(?P<plain>plain)|(?P<sn>sn)|(?P<polar>polar)"
    r"|(?P<it>aon|oni|ns)(?:-(?P<k>\d+))?"
    r"|(?P<pen>soft|srip)(?::(?P<lam>[0-9.eE+-]+))?)$"
)


METHOD_NAMES = (
    "plain, sn, aon, aon-K, oni, oni-T, ns, ns-T, polar, soft, soft:LAMBDA, srip, srip:LAMBDA"
)
"""The method names ``parse_method`` accepts, for help texts and error messages."""

_KNOWN = ("plain", "sn", "polar", "aon", "oni", "ns", "soft", "srip")


def _suggestion(name: str) -> str | None:
    """The known name closest to ``name`` (``difflib``), with its ``-K`` or ``:LAMBDA`` part."""
    m = re.match(r"^([a-z]+?)[-_:]?([0-9][0-9.eE+-]*)?$", name)
    stem, tail = (m[1], m[2]) if m else (name, None)
    close = difflib.get_close_matches(stem, _KNOWN, n=1, cutoff=0.6)
    if not close:
        return None
    family = close[0]
    if tail is None:
        return family
    full = f"{family}:{tail}" if family in ("soft", "srip") else f"{family}-{tail}"
    return full if _PATTERN.match(full) else family


def _parse(text: str) -> Method:
    name = text.strip().lower()
    m = _PATTERN.match(name)
    if m is None:
        hint = _suggestion(name)
        raise ValueError(f"{text.strip()!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
    if m["plain"]:
        return Method("plain", "plain", "plain")
    if m["sn"]:
        return Method("sn", "normalise", "aon", order=0)
    if m["polar"]:
        return Method("polar", "normalise", "polar")
    if m["it"]:
        family, k = m["it"], m["k"]
        if family == "aon":
            return Method(name, "normalise", "aon", order=DEFAULT_ORDER if k is None else int(k))
        return Method(name, "normalise", family, iterations=5 if k is None else int(k))
    family = m["pen"]
    if m["lam"] is None:
        return Method(family, "penalty", family, lam=DEFAULT_LAMBDAS[family])
    try:
        lam = float(m["lam"])
    except ValueError:
        lam = -1.0
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{text.strip()!r} (LAMBDA must be a non-negative number)")
    return Method(f"{family}:{lam:g}", "penalty", family, lam=lam)


def _unknown(bad: list[str]) -> ValueError:
    what = "method" if len(bad) == 1 else "methods"
    return ValueError(f"unknown {what} {', '.join(bad)}; use {METHOD_NAMES}")


def parse_method(text: str) -> Method:
    """Parse one method name (see the module docstring); ``ValueError`` if unknown.

    The message suggests the closest known name, e.g. ``unknown method 'aon3'
    (did you mean 'aon-3'?)``.
    """
    try:
        return _parse(text)
    except ValueError as exc:
        raise _unknown([str(exc)]) from None


def parse_methods(text: str) -> list[Method]:
    """Parse a comma-separated list; every unknown name is reported at once, duplicates too."""
    methods: list[Method] = []
    bad: list[str] = []
    for token in (t for t in text.split(",") if t.strip()):
        try:
            methods.append(_parse(token))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise _unknown(bad)
    if not methods:
        raise ValueError("--methods is empty")
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--methods lists {dup} more than once")
    return methods


@dataclasses.dataclass(frozen=True)
class Scale:
    """Which layers the methods act on, and the gain of the normalised ones.

    ``normalise_head``: whether the classifier (``head.weight``) is normalised
    (and penalised, and measured) like the hidden layers. ``gain``:
    ``"none"`` (``h(W)`` as is), ``"learnable"`` (a scalar per layer,
    initialised at ``gain_init``, trained with the rest) or a fixed number.
    """

    normalise_head: bool
    gain: str
    gain_init: float

    def fixed_gain(self) -> float | None:
        """The fixed gain, or ``None`` for ``"none"``/``"learnable"``."""
        return None if self.gain in ("none", "learnable") else float(self.gain)

    def describe(self) -> str:
        """One line for the reports."""
        head = (
            "all weight layers, the classifier included"
            if self.normalise_head
            else ("all weight layers except the classifier")
        )
        if self.gain == "learnable":
            gain = f"learnable scalar gain per normalised layer (init {self.gain_init:.3g})"
        elif self.gain == "none":
            gain = "no gain on the normalised layers"
        else:
            gain = f"fixed gain {float(self.gain):g} on the normalised layers"
        return f"{head}; {gain}"


def selected_layers(model: nn.Module, scale: Scale) -> dict[str, int]:
    """The weights the methods act on, with their output axes (via ``AON.for_module``)."""
    exclude = () if scale.normalise_head else (HEAD_WEIGHT,)
    t = AON.for_module(model, exclude=exclude)
    assert isinstance(t.include, frozenset)
    return {n: t.out_axes.get(n, 0) for n in sorted(t.include)}


def make_transform(method: Method, model: nn.Module, scale: Scale) -> WeightTransform | None:
    """The library transform of a normalising method (``None`` for plain and the penalties)."""
    if method.kind != "normalise":
        return None
    exclude = () if scale.normalise_head else (HEAD_WEIGHT,)
    gain = scale.fixed_gain()
    if method.family == "aon":
        return AON.for_module(model, exclude=exclude, order=method.order, gain=gain)
    if method.family == "oni":
        return ONI.for_module(model, exclude=exclude, iterations=method.iterations, gain=gain)
    if method.family == "ns":
        return NewtonSchulz.for_module(model, exclude=exclude, steps=method.iterations, gain=gain)
    return Polar.for_module(model, exclude=exclude, gain=gain)

"""The methods of the comparison, by name, and how each is built from the public API.

Names (``--methods`` / ``--method``):

- ``plain``: no normalisation, no penalty.
- ``sn``: spectral normalisation, ``aon_func.AON(order=0)``.
- ``aon``: ``aon_func.AON()`` at the library's default order
  (``aon_func.DEFAULT_ORDER``); ``aon-K``: ``aon_func.AON(order=K)``.
- ``sn@P``, ``aon@P``, ``aon-K@P``: the same with ``n_power_iterations=P``
  power-iteration steps per training step (default 1; for ``K >= 1`` the
  kernel runs at least ``aon_func.SAFEGUARD_ITERATIONS`` steps on the Gram
  matrix whatever ``P``, so ``P <= 12`` are the same method there): the
  ablation of the power iterations per step.
- ``oni`` / ``oni-T``: ``aon_func.ONI(iterations=T)`` (default 5).
- ``ns`` / ``ns-T``: ``aon_func.NewtonSchulz(steps=T)`` (default 5).
- ``polar``: ``aon_func.Polar()``, the exact ``U V^T`` (OWN).
- ``soft`` / ``soft:LAMBDA``: cross-entropy plus
  ``LAMBDA * sum ||W W^T - I||_F^2`` (:func:`aon_func.soft_orthogonality_penalty`).
- ``srip`` / ``srip:LAMBDA``: cross-entropy plus
  ``LAMBDA * sum sigma_max(W W^T - I)^2`` (:func:`aon_func.srip_penalty`, one
  power-iteration step per training step, its vector carried as state).
- ``orth`` / ``orth-cayley`` / ``orth-exp``: torch's orthogonal
  parametrisation (``torch.nn.utils.parametrizations.orthogonal`` with the
  Cayley map or the matrix exponential, ``use_trivialization=False``, so its
  map is a pure function of the raw weight), used functionally through
  :class:`MatrixMap`; ``orth`` is ``orth-cayley``.
- ``aon-fro`` / ``aon-fro-K``: the ablation of AON's prescaling: ``Z`` is
  divided by its Frobenius norm instead of the power-iteration estimate of
  its spectral norm (always inside the series' region, no power iteration
  before the polynomial), then ``P_K(Zb Zb^T) Zb``, then divided by its exact
  spectral norm (:class:`MatrixMap`; the library's kernel is unchanged).
- ``wd`` / ``wd:DECAY``: control: plain, trained with decoupled weight decay
  (``torch.optim.AdamW(weight_decay=DECAY)`` on every parameter; default 0.01,
  AdamW's own).
- ``es``: control: plain with early stopping on validation: the reported
  model is the one of the epoch with the best validation accuracy (training
  runs every epoch, so the selection equals any patience long enough).

The normalising methods (``sn``, ``aon*``, ``oni*``, ``ns*``, ``polar``,
``orth*``) all transform the same layers with the same gain (:class:`Scale`);
the penalties act on the same layers; ``plain`` and the controls leave them
alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .. import (
    AON,
    DEFAULT_ORDER,
    GAIN_SUFFIX,
    ONI,
    NewtonSchulz,
    Polar,
    WeightTransform,
    gain_key,
)
from .models import HEAD_WEIGHT

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_LAMBDAS",
    "METHOD_NAMES",
    "MatrixMap",
    "Method",
    "Scale",
    "Transform",
    "frobenius_aon",
    "make_transform",
    "parse_method",
    "parse_methods",
    "selected_layers",
    "torch_orthogonal",
    "with_value",
    "without_gain",
]

DEFAULT_LAMBDAS = {"soft": 1e-3, "srip": 1e-3}
"""Penalty weights of ``soft`` and ``srip`` without ``:LAMBDA``: the best of
the sweep on the MNIST-1D MLP (docs/results.md); the best weight differs on
the other models, which is the point of the comparison."""

DEFAULT_DECAY = 1e-2
"""``wd``'s decoupled weight decay without ``:DECAY`` (``torch.optim.AdamW``'s default)."""

Kind = Literal["plain", "normalise", "penalty", "control"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison, parsed from its name."""

    name: str
    kind: Kind
    family: str
    order: int = 0
    iterations: int = 0
    lam: float = 0.0
    variant: str = ""
    power_iterations: int = 1
    """``n_power_iterations`` of the AON family (``sn``, ``aon*``): ``@P`` in the name."""
    tunable: bool = False
    """Parsed without its order or weight (``aon``, ``soft``...): ``--tune`` chooses it."""

    @property
    def label(self) -> str:
        """A human description, e.g. ``AON K=2`` or ``soft orth. lambda=0.001``."""
        if self.family == "aon":
            base = "SN (AON K=0)" if self.order == 0 else f"AON K={self.order}"
            if self.power_iterations != 1:
                base += f", {self.power_iterations} power it./step"
            return base
        if self.family == "aon-fro":
            return f"AON K={self.order}, Frobenius prescaling"
        if self.family == "orth":
            return f"torch orthogonal ({self.variant})"
        if self.family == "wd":
            return f"AdamW weight decay {self.lam:g}"
        if self.family == "es":
            return "plain + early stopping (val.)"
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
    r"^(?:(?P<plain>plain)|(?P<sn>sn)(?:@(?P<snpi>\d+))?|(?P<polar>polar)|(?P<es>es)"
    r"|(?P<orth>orth)(?:-(?P<map>cayley|exp))?"
    r"|(?P<fro>aon-fro)(?:-(?P<fk>\d+))?"
    r"|(?P<it>aon|oni|ns)(?:-(?P<k>\d+))?(?:@(?P<pi>\d+))?"
    r"|(?P<pen>soft|srip|wd)(?::(?P<lam>[0-9.eE+-]+))?)$"
)


METHOD_NAMES = (
    "plain, sn, sn@P, aon, aon-K, aon@P, aon-K@P, oni, oni-T, ns, ns-T, polar, soft, soft:LAMBDA, "
    "srip, srip:LAMBDA, orth, orth-cayley, orth-exp, aon-fro, aon-fro-K, wd, wd:DECAY, es"
)
"""The method names ``parse_method`` accepts, for help texts and error messages."""

_KNOWN = ("plain", "sn", "polar", "aon", "oni", "ns", "soft", "srip", "orth", "wd", "es")


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
    full = f"{family}:{tail}" if family in ("soft", "srip", "wd") else f"{family}-{tail}"
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
        p = _power_iterations(text, m["snpi"])
        return Method(_with_pi("sn", p), "normalise", "aon", order=0, power_iterations=p)
    if m["polar"]:
        return Method("polar", "normalise", "polar")
    if m["es"]:
        return Method("es", "control", "es")
    if m["orth"]:
        variant = m["map"] or "cayley"
        return Method(f"orth-{variant}", "normalise", "orth", variant=variant)
    if m["fro"]:
        k = m["fk"]
        if k is None:
            return Method("aon-fro", "normalise", "aon-fro", order=DEFAULT_ORDER, tunable=True)
        return Method(name, "normalise", "aon-fro", order=int(k))
    if m["it"]:
        family, k = m["it"], m["k"]
        if family == "aon":
            p = _power_iterations(text, m["pi"])
            if k is None:
                return Method(
                    _with_pi("aon", p),
                    "normalise",
                    "aon",
                    order=DEFAULT_ORDER,
                    power_iterations=p,
                    tunable=True,
                )
            return Method(
                _with_pi(f"aon-{int(k)}", p), "normalise", "aon", order=int(k), power_iterations=p
            )
        if m["pi"] is not None:
            raise ValueError(f"{text.strip()!r} (@P, power iterations, is for sn and aon only)")
        return Method(name, "normalise", family, iterations=5 if k is None else int(k))
    family = m["pen"]
    kind: Kind = "control" if family == "wd" else "penalty"
    if m["lam"] is None:
        default = DEFAULT_DECAY if family == "wd" else DEFAULT_LAMBDAS[family]
        return Method(family, kind, family, lam=default, tunable=True)
    try:
        lam = float(m["lam"])
    except ValueError:
        lam = -1.0
    if not (math.isfinite(lam) and lam >= 0):
        what = "DECAY" if family == "wd" else "LAMBDA"
        raise ValueError(f"{text.strip()!r} ({what} must be a non-negative number)")
    return Method(f"{family}:{lam:g}", kind, family, lam=lam)


def _power_iterations(text: str, tail: str | None) -> int:
    if tail is None:
        return 1
    if int(tail) < 1:
        raise ValueError(f"{text.strip()!r} (@P needs P >= 1 power iterations per step)")
    return int(tail)


def _with_pi(stem: str, p: int) -> str:
    """The canonical name: ``@P`` only when ``P`` is not the default 1."""
    return stem if p == 1 else f"{stem}@{p}"


def with_value(method: Method, value: float) -> Method:
    """``method`` with its tunable order (``aon``, ``aon-fro``) or weight (``soft``, ``srip``,
    ``wd``) set to ``value``: the concrete method of one grid point."""
    if method.family == "aon":
        return parse_method(_with_pi(f"aon-{int(value)}", method.power_iterations))
    if method.family == "aon-fro":
        return parse_method(f"aon-fro-{int(value)}")
    if method.family in ("soft", "srip", "wd"):
        return parse_method(f"{method.family}:{value:g}")
    raise ValueError(f"{method.name} has no order or weight to tune")


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


@dataclasses.dataclass(frozen=True)
class MatrixMap:
    """A stateless transform that maps the matrix view of each selected weight with ``fn``.

    ``layers`` pairs each weight's name with its output axis; the matrix view
    is ``(d_out, -1)``. ``fn`` maps a matrix to one of the same shape. A
    learnable gain ``name:gain`` in ``params`` (:meth:`add_gains`) or the fixed
    ``gain`` multiplies the result, as in :class:`aon_func.WeightTransform`.
    """

    layers: tuple[tuple[str, int], ...]
    fn: Callable[[Tensor], Tensor]
    gain: float | None = None

    def init(
        self, params: Mapping[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """No state: ``{}``."""
        return {}

    def add_gains(self, params: Mapping[str, Tensor], *, init: float = 1.0) -> dict[str, Tensor]:
        """``params`` plus a scalar gain ``name:gain`` (value ``init``) per selected weight."""
        out = dict(params)
        for name, _ in self.layers:
            w = params[name]
            out[gain_key(name)] = torch.full((), init, dtype=w.dtype, device=w.device)
        return out

    def apply(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor] | None = None,
        *,
        training: bool = True,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The weights (gains applied, gain entries dropped) and the (empty) state."""
        out = {k: v for k, v in params.items() if not k.endswith(GAIN_SUFFIX)}
        for name, axis in self.layers:
            w = params[name]
            z = w.movedim(axis, 0)
            q = self.fn(z.reshape(z.shape[0], -1)).reshape(z.shape).movedim(0, axis)
            key = gain_key(name)
            if key in params:
                q = params[key] * q
            elif self.gain is not None:
                q = self.gain * q
            out[name] = q
        return out, dict(state or {})


Transform = WeightTransform | MatrixMap
"""What training needs of a transform: ``init``, ``apply`` and ``add_gains``."""


def without_gain(transform: Transform) -> Transform:
    """``transform`` without its fixed gain (learnable gains are left out of the params instead)."""
    return dataclasses.replace(transform, gain=None)


def torch_orthogonal(variant: str) -> Callable[[Tensor], Tensor]:
    """torch's orthogonal map (``"cayley"`` or ``"exp"``) as a pure function of a matrix.

    ``torch.nn.utils.parametrizations.orthogonal`` with
    ``use_trivialization=False`` maps a raw matrix ``X`` to an orthonormal one
    (the skew part of ``X.tril()`` through the Cayley map or the matrix
    exponential; tall or wide as ``X``); its parametrization module is built
    once per shape and called on the raw weight.
    """
    from torch.nn.utils import parametrizations

    orth_map = {"cayley": "cayley", "exp": "matrix_exp"}[variant]
    cache: dict[tuple[int, int], nn.Module] = {}

    def fn(x: Tensor) -> Tensor:
        key = (int(x.shape[0]), int(x.shape[1]))
        if key not in cache:
            holder = nn.Linear(key[1], key[0], bias=False)
            parametrizations.orthogonal(holder, orthogonal_map=orth_map, use_trivialization=False)
            cache[key] = holder.parametrizations.weight[0]  # type: ignore[index,union-attr,assignment]
        out: Tensor = cache[key](x)
        return out

    return fn


def _taylor(order: int) -> list[float]:
    """``c_j = binom(2j, j) / 4^j``: the Taylor coefficients of ``(1 - e)^(-1/2)``."""
    return [math.comb(2 * j, j) / 4**j for j in range(order + 1)]


def frobenius_aon(order: int) -> Callable[[Tensor], Tensor]:
    """AON of order ``K`` with Frobenius prescaling: ``SN(P_K(Zb Zb^T) Zb)``, ``Zb = Z / ||Z||_F``.

    ``||Zb||_2 <= 1`` always, so the series needs no spectral estimate; the
    final division is by the exact spectral norm (``torch.linalg.matrix_norm``,
    ``ord=2``). The short side is normalised (tall matrices are transposed).
    """
    coeffs = _taylor(order)

    def fn(z: Tensor) -> Tensor:
        tall = z.shape[0] > z.shape[1]
        zb = z.mT if tall else z
        zb = zb / torch.linalg.matrix_norm(zb).clamp_min(1e-12)
        eye = torch.eye(zb.shape[0], dtype=zb.dtype, device=zb.device)
        e = eye - zb @ zb.mT
        p = coeffs[-1] * eye
        for c in reversed(coeffs[:-1]):
            p = c * eye + e @ p
        y = p @ zb
        y = y / torch.linalg.matrix_norm(y, ord=2).clamp_min(1e-12)
        return y.mT if tall else y

    return fn


def make_transform(method: Method, model: nn.Module, scale: Scale) -> Transform | None:
    """The transform of a normalising method (``None`` for plain, the penalties and the controls)."""
    if method.kind != "normalise":
        return None
    exclude = () if scale.normalise_head else (HEAD_WEIGHT,)
    gain = scale.fixed_gain()
    if method.family in ("orth", "aon-fro"):
        layers = tuple(selected_layers(model, scale).items())
        fn = (
            torch_orthogonal(method.variant)
            if method.family == "orth"
            else frobenius_aon(method.order)
        )
        return MatrixMap(layers, fn, gain)
    if method.family == "aon":
        return AON.for_module(
            model,
            exclude=exclude,
            order=method.order,
            gain=gain,
            n_power_iterations=method.power_iterations,
        )
    if method.family == "oni":
        return ONI.for_module(model, exclude=exclude, iterations=method.iterations, gain=gain)
    if method.family == "ns":
        return NewtonSchulz.for_module(model, exclude=exclude, steps=method.iterations, gain=gain)
    return Polar.for_module(model, exclude=exclude, gain=gain)

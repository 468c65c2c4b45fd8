"""Whole-model transforms: raw parameters in, normalised weights out.

A transform is an immutable configuration with two pure functions,
``init(params) -> state`` and ``apply(params, state) -> (weights, state)``.
The engine (:meth:`WeightTransform.apply`) is written once: it selects the
tensors to normalise, groups them by (oriented matrix shape, dtype, device),
stacks each group, maps it with ``torch.func.vmap`` over a one-matrix kernel
(or loops, see ``batching``) and unstacks. Subclasses only say which
one-matrix map to run: :class:`AON` (and spectral normalisation as its order
0), :class:`Polar`, :class:`ONI` and :class:`NewtonSchulz`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from ._checks import (
    check_eps,
    check_nonneg_int,
    check_out_axis,
    check_u,
    check_weight,
    compute_dtype_for,
    describe,
)
from ._kernel import (
    DEFAULT_EPS,
    DEFAULT_ORDER,
    STATELESS_POWER_ITERATIONS,
    aon_matrix,
    gram_iterate,
    start_vector,
)
from ._layout import Layout, from_matrix, layout_of, to_matrix
from ._neighbours import newton_schulz_matrix, oni_matrix, polar_matrix

__all__ = [
    "AON",
    "GAIN_SUFFIX",
    "ONI",
    "Include",
    "NewtonSchulz",
    "Params",
    "Polar",
    "State",
    "WeightTransform",
    "gain_key",
]

Params = Mapping[str, Tensor]
"""A model's tensors by name, e.g. ``dict(model.named_parameters())``."""

State = dict[str, Tensor]
"""Power-iteration vectors ``u`` by parameter name (empty for stateless maps)."""

Include = str | re.Pattern[str] | Callable[[str, Tensor], bool] | Collection[str] | None
"""Which tensors to normalise: a regular expression (a string or a compiled
pattern, ``search``-ed in the name), a predicate ``(name, tensor) -> bool``, a
collection of names, or ``None`` for the default (floating, ``ndim >= 2``,
name ending in ``weight``)."""

Batching = Literal["auto", "vmap", "loop"]

GAIN_SUFFIX = ":gain"
"""Suffix of the learnable-gain entries that :meth:`WeightTransform.add_gains` adds."""

_T = TypeVar("_T", bound="WeightTransform")

MatrixFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def gain_key(name: str) -> str:
    """The params key of the learnable gain of tensor ``name`` (``name + ':gain'``)."""
    return name + GAIN_SUFFIX


def _check_gain(key: str, gain: object, params: Params, selected: Mapping[str, Layout]) -> None:
    """A learnable gain must be a 0-d floating tensor on its weight's device."""
    name = key[: -len(GAIN_SUFFIX)]
    if name not in selected:
        raise ValueError(f"params has gain {key!r} but {name!r} is not a normalised tensor")
    if not isinstance(gain, Tensor):
        raise TypeError(
            f"params[{key!r}] must be a 0-d Tensor (a learnable gain), got {type(gain).__name__}"
        )
    w = params[name]
    if gain.ndim != 0 or not gain.dtype.is_floating_point or gain.device != w.device:
        raise ValueError(
            f"params[{key!r}] must be a 0-d floating tensor on {w.device} (the gain of "
            f"params[{name!r}]), got {describe(gain)}"
        )


def _rebuild(cls: type[_T], fields: dict[str, Any]) -> _T:
    return cls(**fields)


def _default_include(name: str, tensor: Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.ndim >= 2 and name.endswith("weight")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightTransform:
    """Base of the whole-model transforms; use :class:`AON` or a neighbour.

    Args:
        include: which tensors to normalise (see :data:`Include`). A tensor
            that an explicit ``include`` selects but that cannot be normalised
            (``ndim < 2``, not floating) is an error, and so is a selection
            that matches nothing.
        out_axes: output axis per parameter name (default 0; 1 for
            ConvTranspose weights, which :meth:`for_module` records).
        gain: fixed scalar gain ``g`` in ``g * h(W)`` (default 1). Learnable
            gains live in ``params`` instead, see :meth:`add_gains`.
        eps: lower clamp of norms and spectral estimates.
        compute_dtype: dtype of the computation (default float32 for
            float16/bfloat16 tensors, their own dtype otherwise).
        batching: ``"vmap"`` stacks same-shaped matrices and maps the kernel
            with ``torch.func.vmap``; ``"loop"`` runs it once per tensor;
            ``"auto"`` picks per device (see ``docs/performance.md``).
    """

    include: Include = None
    out_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    gain: float | None = None
    eps: float = DEFAULT_EPS
    compute_dtype: torch.dtype | None = None
    batching: Batching = "auto"

    stateful: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_eps(self.eps)
        if self.batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {self.batching!r}")
        if self.gain is not None and (
            isinstance(self.gain, bool) or not isinstance(self.gain, (int, float))
        ):
            raise TypeError(f"gain must be a float or None, got {self.gain!r}")
        compute_dtype_for(torch.float32, self.compute_dtype)  # the kernel's own check, up front
        if not isinstance(self.out_axes, Mapping):
            raise TypeError(
                f"out_axes must be a mapping name -> int, got {type(self.out_axes).__name__}"
            )
        object.__setattr__(self, "out_axes", MappingProxyType(dict(self.out_axes)))
        include = self.include
        if (
            include is not None
            and not isinstance(include, (str, re.Pattern))
            and not callable(include)
        ):
            if not isinstance(include, Collection):
                raise TypeError(
                    "include must be None, a regular expression, a predicate (name, tensor) -> bool "
                    f"or a collection of names, got {type(include).__name__}"
                )
            object.__setattr__(self, "include", frozenset(include))

    def __reduce__(self) -> tuple[Any, ...]:
        # ``out_axes`` is a read-only ``MappingProxyType``, which cannot be
        # pickled: rebuild from the fields, so that transforms (and modules
        # that hold one, see ``parametrize``) pickle and deep-copy.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["out_axes"] = dict(self.out_axes)
        return (_rebuild, (type(self), fields))

    # ------------------------------------------------------------------ selection

    def _selects(self, name: str, tensor: Tensor) -> bool:
        include = self.include
        if include is None:
            return _default_include(name, tensor)
        if isinstance(include, str):
            return re.search(include, name) is not None
        if isinstance(include, re.Pattern):
            return include.search(name) is not None
        if callable(include):
            return bool(include(name, tensor))
        return name in include

    def select(self, params: Params) -> dict[str, Layout]:
        """The tensors this transform normalises, with their matrix layouts.

        Raises ``ValueError``/``TypeError`` for a selected tensor that cannot
        be normalised, a name in ``include``/``out_axes`` that ``params``
        lacks, or a selection that matches nothing.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> Tensor, got {type(params).__name__}")
        selected: dict[str, Layout] = {}
        for name, tensor in params.items():
            if name.endswith(GAIN_SUFFIX):
                continue
            if not isinstance(tensor, Tensor):
                raise TypeError(f"params[{name!r}] must be a Tensor, got {type(tensor).__name__}")
            if not self._selects(name, tensor):
                continue
            check_weight(tensor, f"params[{name!r}] (selected by include)")
            axis = check_out_axis(self.out_axes.get(name, 0), tensor, f"params[{name!r}]")
            selected[name] = layout_of(tensor.shape, axis)
        if isinstance(self.include, frozenset):
            missing = sorted(self.include - set(params))
            if missing:
                raise ValueError(
                    f"include names {missing} are not in params (params from another model?)"
                )
        unknown = sorted(set(self.out_axes) - set(params))
        if unknown:
            raise ValueError(
                f"out_axes names {unknown} are not in params (params from another model?)"
            )
        if not selected:
            raise ValueError(
                f"include={self.include!r} selects no tensor of params (keys: {sorted(params)[:8]}...); "
                "a transform that normalises nothing is almost surely a mistake"
            )
        for name, gain in params.items():
            if name.endswith(GAIN_SUFFIX):
                _check_gain(name, gain, params, selected)
        return selected

    def _cdtype(self, tensor: Tensor) -> torch.dtype:
        return compute_dtype_for(tensor.dtype, self.compute_dtype)

    # ------------------------------------------------------------------ per-matrix map

    def _matrix_fn(self, *, stateless: bool) -> MatrixFn:
        """The one-matrix map ``(z, u) -> (h, u_new)`` this transform runs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state

    def init(self, params: Params, *, generator: torch.Generator | None = None) -> State:
        """Initial state: one unit vector ``u`` per normalised tensor (none for stateless maps).

        Stateless transforms return ``{}``; see :meth:`AON.init` for AON's.
        """
        self.select(params)
        return {}

    def check_state(
        self, params: Params, state: State, selected: Mapping[str, Layout] | None = None
    ) -> None:
        """Raise a clear error unless ``state`` belongs to ``params`` under this transform."""
        if selected is None:
            selected = self.select(params)
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping name -> Tensor (from init), got {type(state).__name__}"
            )
        expected = set(selected) if self.stateful else set()
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(
                f"state does not match params: missing keys {missing}, unexpected keys {extra} "
                "(state from init() of another model or transform?)"
            )
        for name, layout in selected.items() if self.stateful else ():
            w = params[name]
            check_u(
                state[name],
                layout.matrix_shape[0],
                self._cdtype(w),
                w.device,
                name=f"state[{name!r}]",
                weight=f"params[{name!r}] with {describe(w)}",
                optional=False,
            )

    # ------------------------------------------------------------------ gains

    def add_gains(self, params: Params, *, init: float = 1.0) -> dict[str, Tensor]:
        """``params`` plus a learnable scalar gain ``name + ':gain'`` per normalised tensor.

        :meth:`apply` multiplies each normalised weight by its gain and drops
        the gain entries from the weights it returns, so the module never sees
        them. Gains take the weight's dtype and device, and ``requires_grad``
        when the weight does. ``params`` itself is not modified.

        Example:
            >>> import torch, aon_func
            >>> params = {"fc.weight": torch.randn(4, 8), "fc.bias": torch.zeros(4)}
            >>> p = aon_func.AON().add_gains(params, init=2.0)
            >>> sorted(p)
            ['fc.bias', 'fc.weight', 'fc.weight:gain']
        """
        out = dict(params)
        for name in self.select(params):
            w = params[name]
            g = torch.full((), float(init), dtype=w.dtype, device=w.device)
            out[gain_key(name)] = g.requires_grad_(w.requires_grad)
        return out

    # ------------------------------------------------------------------ apply

    def _use_vmap(self, device: torch.device) -> bool:
        """The batching rule: ``"auto"`` loops on the CPU and uses ``vmap`` elsewhere.

        On the CPU the loop already runs close to the batched products'
        roofline, while ``vmap`` adds work (the stacking copy and its
        backward, batched forms of the small operations): 1.0-1.4x the
        loop's time forward and 1.2-1.9x forward+backward on the benchmark
        models. On a GPU one batched launch replaces many small ones.
        Measured in ``docs/performance.md`` (``aon-func bench``).
        """
        if self.batching == "auto":
            return device.type != "cpu"
        return self.batching == "vmap"

    def apply(
        self, params: Params, state: State | None = None, *, training: bool = True
    ) -> tuple[dict[str, Tensor], State]:
        """Normalised weights for the whole model, and the advanced state. Pure.

        Selected tensors are grouped by (oriented matrix shape, dtype,
        device); each group is stacked, mapped by the one-matrix kernel and
        unstacked. Nothing is changed in place, and the input is checked
        first (see :meth:`select` and :meth:`check_state`), so bad input fails
        here with a message that names the tensor, never inside the kernel.

        Args:
            params: the model's raw tensors by name (plus any gain entries).
            state: from :meth:`init`; ``None`` uses the stateless mode (each
                ``u`` from a fixed vector, ``STATELESS_POWER_ITERATIONS``
                iterations), whose new state is the converged vectors.
            training: when ``False`` a given state is returned unchanged
                (the weights are computed the same way).

        Returns:
            ``(weights, new_state)``: ``weights`` has every key of ``params``
            except gain entries; unselected tensors are the same objects.
        """
        selected = self.select(params)
        if state is not None:
            self.check_state(params, state, selected)
        fn = self._matrix_fn(stateless=state is None)
        weights = {n: t for n, t in params.items() if not n.endswith(GAIN_SUFFIX)}
        new_state: State = dict(state) if state is not None else {}
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, layout in selected.items():
            w = params[name]
            groups.setdefault((layout.matrix_shape, w.dtype, w.device), []).append(name)
        for (mshape, dtype, device), names in groups.items():
            cdtype = compute_dtype_for(dtype, self.compute_dtype)
            zs = [to_matrix(params[n], selected[n]).to(cdtype) for n in names]
            if state is not None and self.stateful:
                us = [state[n] for n in names]
            else:
                us = [start_vector(mshape[0], cdtype, device)] * len(names)
            if len(names) > 1 and self._use_vmap(device):
                hb, ub = torch.func.vmap(fn)(torch.stack(zs), torch.stack(us))
                hs, u_news = list(hb.unbind(0)), list(ub.unbind(0))
            else:
                outs = [fn(z, u) for z, u in zip(zs, us, strict=True)]
                hs, u_news = [o[0] for o in outs], [o[1] for o in outs]
            for n, h, u_new in zip(names, hs, u_news, strict=True):
                # Gains multiply in the compute dtype, before the cast back.
                if self.gain is not None:
                    h = h * self.gain
                g = params.get(gain_key(n))
                if g is not None:
                    h = h * g.to(cdtype)
                weights[n] = from_matrix(h, selected[n]).to(dtype)
                if self.stateful and (training or state is None):
                    new_state[n] = u_new
        return weights, new_state

    def functional_call(
        self,
        module: nn.Module,
        params: Params,
        state: State | None,
        args: Any,
        kwargs: dict[str, Any] | None = None,
        *,
        training: bool = True,
    ) -> tuple[Any, State]:
        """Run ``module`` with the normalised weights: ``(output, new_state)``.

        ``torch.func.functional_call`` with :meth:`apply`'s weights; the
        module's own buffers are used unless ``params`` holds them.
        """
        weights, new_state = self.apply(params, state, training=training)
        tensors = {**dict(module.named_buffers()), **weights}
        if not isinstance(args, tuple):
            args = (args,)
        out = torch.func.functional_call(module, tensors, args, kwargs)
        return out, new_state

    # ------------------------------------------------------------------ modules

    @classmethod
    def for_module(
        cls: type[_T], module: nn.Module, *, exclude: Iterable[str] = (), **options: Any
    ) -> _T:
        """A transform that normalises the weights of ``module``'s linear maps.

        Selects the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` and
        ``ConvTranspose1d/2d/3d`` (output axis 1) and the input projections of
        ``MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``;
        its ``out_proj`` is a ``Linear``). Embeddings and normalisation layers
        are skipped. ``exclude`` lists parameter names to leave alone (e.g.
        the classifier head).

        Example:
            >>> import torch, aon_func
            >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            >>> sorted(aon_func.AON.for_module(net, exclude=["2.weight"]).include)
            ['0.weight']
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
        if "include" in options:
            raise TypeError(
                "for_module chooses include itself; pass exclude=[names] to leave weights out, "
                "or construct the transform directly to choose include"
            )
        exclude = set(exclude)
        unknown = sorted(exclude - set(names))
        if unknown:
            raise ValueError(
                f"exclude names {unknown} are not weights that for_module selects: {sorted(names)}"
            )
        chosen = {n: a for n, a in names.items() if n not in exclude}
        out_axes = {n: a for n, a in chosen.items() if a != 0}
        out_axes.update(options.pop("out_axes", {}))
        return cls(include=frozenset(chosen), out_axes=out_axes, **options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AON(WeightTransform):
    r"""Approximated orthonormal normalisation of a whole model, as a pure transform.

    Each selected weight ``W`` becomes ``g * h(W)`` with ``h`` the AON map of
    :func:`aon_func.aon` (order ``K``); ``order=0`` is spectral normalisation.

    Args:
        order: Taylor order ``K >= 0``.
        n_power_iterations: power-iteration steps per :meth:`apply` in training.
        init_iterations: power iterations :meth:`init` runs to warm ``u`` up.
        (others): see :class:`WeightTransform`.

    Example:
        >>> import torch, aon_func
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        >>> aon = aon_func.AON(order=2)
        >>> params = dict(net.named_parameters())
        >>> state = aon.init(params, generator=torch.Generator().manual_seed(0))
        >>> weights, state = aon.apply(params, state)
        >>> out, state = aon.functional_call(net, params, state, torch.randn(5, 8))
        >>> out.shape
        torch.Size([5, 4])
    """

    order: int = DEFAULT_ORDER
    n_power_iterations: int = 1
    init_iterations: int = STATELESS_POWER_ITERATIONS

    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonneg_int(self.order, "order")
        check_nonneg_int(self.n_power_iterations, "n_power_iterations")
        check_nonneg_int(self.init_iterations, "init_iterations")

    def _matrix_fn(self, *, stateless: bool) -> MatrixFn:
        iterations = (
            max(self.n_power_iterations, STATELESS_POWER_ITERATIONS)
            if stateless
            else self.n_power_iterations
        )
        order, eps = self.order, self.eps

        def fn(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return aon_matrix(z, u, order=order, n_power_iterations=iterations, eps=eps)

        return fn

    def init(self, params: Params, *, generator: torch.Generator | None = None) -> State:
        """One unit vector ``u`` per normalised tensor, drawn from ``generator`` and warmed up.

        Each ``u`` is a Gaussian draw (same seed, same state), then
        ``init_iterations`` power iterations on the ``k x k`` Gram matrix
        (64 by default, as in the stateless mode: enough for the spectral
        estimate of a freshly initialised layer to be within about 1e-3 of
        ``s_max``, so the first training steps already see unit spectral
        norm). ``params`` is not modified.

        For an ensemble (parameters stacked on a leading axis), ``vmap`` of
        ``init`` is not possible (random draws under ``vmap``): init each
        member's parameters and stack the states, see ``docs/usage.md``.
        """
        selected = self.select(params)
        state: State = {}
        with torch.no_grad():
            for name, layout in selected.items():
                w = params[name]
                cdtype = self._cdtype(w)
                k = layout.matrix_shape[0]
                u = torch.randn(
                    k,
                    generator=generator,
                    dtype=cdtype,
                    device=generator.device if generator is not None else w.device,
                )
                u = (u / u.norm().clamp_min(self.eps)).to(w.device)
                z = to_matrix(w.detach(), layout).to(cdtype)
                u = gram_iterate(z @ z.mT, u, self.init_iterations, self.eps)
                state[name] = u.clone()
        return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class Polar(WeightTransform):
    """Exact orthonormal factor ``U V^T`` by SVD (orthogonal weight normalisation, OWN).

    Stateless (``init`` returns ``{}``); the ``K -> inf`` limit of AON.

    Example:
        >>> import torch, aon_func
        >>> w, _ = aon_func.Polar().apply({"weight": torch.randn(3, 5)})
        >>> torch.allclose(w["weight"] @ w["weight"].T, torch.eye(3), atol=1e-5)
        True
    """

    def _matrix_fn(self, *, stateless: bool) -> MatrixFn:
        def fn(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return polar_matrix(z), u

        return fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class ONI(WeightTransform):
    """Orthogonalization by Newton's iteration (Huang et al. 2020), ``iterations`` steps.

    Stateless. With 5 steps, singular values ``s`` of ``W`` with ``s / s_max``
    above about 0.3 land within 1e-2 of 1; smaller ones stay smaller.

    Example:
        >>> import torch, aon_func
        >>> w, _ = aon_func.ONI(iterations=5).apply({"weight": torch.randn(3, 5)})
        >>> w["weight"].shape
        torch.Size([3, 5])
    """

    iterations: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonneg_int(self.iterations, "iterations")

    def _matrix_fn(self, *, stateless: bool) -> MatrixFn:
        iterations, eps = self.iterations, self.eps

        def fn(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return oni_matrix(z, iterations, eps), u

        return fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewtonSchulz(WeightTransform):
    """Muon's quintic Newton-Schulz iteration, ``steps`` steps (stateless).

    Approximate by design: singular values land in roughly ``[0.7, 1.2]``.

    Example:
        >>> import torch, aon_func
        >>> w, _ = aon_func.NewtonSchulz(steps=5).apply({"weight": torch.randn(3, 5)})
        >>> w["weight"].shape
        torch.Size([3, 5])
    """

    steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonneg_int(self.steps, "steps")

    def _matrix_fn(self, *, stateless: bool) -> MatrixFn:
        steps, eps = self.steps, self.eps

        def fn(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return newton_schulz_matrix(z, steps, eps), u

        return fn

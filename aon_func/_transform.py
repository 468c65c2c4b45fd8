"""Whole-model transforms: raw parameters in, normalised weights out.

A transform is an immutable, hashable configuration with two pure functions,
``init(params) -> state`` and ``apply(params, state) -> (weights, state)``.
The engine is written once: :meth:`WeightTransform.apply` looks up (or
computes, once per input structure) a :class:`~aon_func._plan.Plan` that
says which tensors are normalised and which share a batched kernel call, and
runs it (:func:`~aon_func._plan.execute`). Subclasses only say which batched
kernel to run and what it costs: :class:`AON` (and spectral normalisation as
its order 0), :class:`Polar`, :class:`ONI` and :class:`NewtonSchulz`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_eps,
    check_gain,
    check_generator,
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
    check_matmul_dtype,
    power_iterate,
    prescale,
    repair_state,
    start_vector,
)
from ._layout import Layout, layout_of, to_matrix
from ._neighbours import newton_schulz_matrix, oni_matrix, polar_matrix
from ._plan import (
    Bucket,
    Flops,
    Group,
    KernelFn,
    Plan,
    choose_buckets,
    cost_model_for,
    execute,
    flops_per_matrix,
    itemsize,
)
from ._select import FrozenDict, Include, choose_module_weights, normalise_include, selects

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

Batching = Literal["auto", "vmap", "loop"]

GAIN_SUFFIX = ":gain"
"""Suffix of the learnable-gain entries that :meth:`WeightTransform.add_gains` adds."""

_T = TypeVar("_T", bound="WeightTransform")

_PLAN_CACHE_SIZE = 128


def gain_key(name: str) -> str:
    """The params key of the learnable gain of tensor ``name`` (``name + ':gain'``)."""
    return name + GAIN_SUFFIX


def _check_gain_entry(
    key: str, gain: object, params: Params, selected: Mapping[str, Layout]
) -> None:
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


def _structure(tensors: object, what: str) -> tuple[Any, ...]:
    """The metadata a plan depends on: ``(name, shape, dtype, device)`` per entry."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping name -> Tensor, got {type(tensors).__name__}")
    out = []
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            kind = (
                "a 0-d Tensor (a learnable gain)"
                if name.endswith(GAIN_SUFFIX)
                else "a torch.Tensor"
            )
            raise TypeError(f"{what}[{name!r}] must be {kind}, got {type(t).__name__}")
        out.append((name, t.shape, t.dtype, t.device))
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightTransform:
    """Base of the whole-model transforms; use :class:`AON` or a neighbour.

    Transforms are values: frozen, hashable and equal when their options are
    equal, so they can key caches and dicts (the engine caches its plans on
    ``(transform, input structure)``).

    Args:
        include: which tensors to normalise (see :data:`Include`). A tensor
            that an explicit ``include`` selects but that cannot be normalised
            (``ndim < 2``, not floating) is an error, and so is a selection
            that matches nothing. A predicate is called once per input
            structure (names, shapes, dtypes, devices): it should look at the
            name and the tensor's metadata, not its values.
        out_axes: output axis per parameter name (default 0; 1 for
            ConvTranspose weights, which :meth:`for_module` records).
        gain: fixed scalar gain ``g`` in ``g * h(W)`` (default 1), finite and
            ``> 0``. Learnable gains live in ``params`` instead, see :meth:`add_gains`.
        eps: numerical floor, in ``(0, 1e-3]`` (see :func:`aon_func.aon`).
        compute_dtype: dtype of the computation (default float32 for
            float16/bfloat16 tensors, their own dtype otherwise).
        batching: ``"auto"`` (default) runs the batched kernel over buckets of
            matrices chosen by a cost model (``docs/performance.md``);
            ``"loop"`` runs it once per tensor; ``"vmap"`` stacks each group
            of same-shaped tensors and maps a one-matrix call with
            ``torch.func.vmap`` (kept for comparison).
    """

    include: Include = None
    out_axes: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
    gain: float | None = None
    eps: float = DEFAULT_EPS
    compute_dtype: torch.dtype | None = None
    batching: Batching = "auto"

    stateful: ClassVar[bool] = False
    pad_exact: ClassVar[bool] = True
    """Whether zero padding commutes with the map (so nearby shapes may share a bucket)."""

    def __post_init__(self) -> None:
        check_eps(self.eps)
        if self.batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {self.batching!r}")
        if self.gain is not None:
            object.__setattr__(self, "gain", check_gain(self.gain, "gain", optional=True))
        compute_dtype_for(torch.float32, self.compute_dtype)  # the kernel's own check, up front
        if not isinstance(self.out_axes, Mapping):
            raise TypeError(
                f"out_axes must be a mapping name -> int, got {type(self.out_axes).__name__}"
            )
        object.__setattr__(self, "out_axes", FrozenDict(self.out_axes))
        object.__setattr__(self, "include", normalise_include(self.include))

    # ------------------------------------------------------------------ the plan

    def _plan(self, params: Params, state: Mapping[str, Tensor] | None) -> Plan:
        """The cached plan for this input structure (validating it the first time)."""
        if torch.compiler.is_compiling():
            return self._build_plan(params, state)
        key = (
            self,
            _structure(params, "params"),
            None if state is None else _structure(state, "state"),
        )
        plan = _PLANS.get(key)
        if plan is None:
            plan = self._build_plan(params, state)
            _PLANS[key] = plan
            if len(_PLANS) > _PLAN_CACHE_SIZE:
                _PLANS.popitem(last=False)
        else:
            _PLANS.move_to_end(key)
        return plan

    def _build_plan(self, params: Params, state: Mapping[str, Tensor] | None) -> Plan:
        selected = self._select(params)
        if state is not None:
            self.check_state(params, state, selected)
        gains = frozenset(n for n in selected if gain_key(n) in params)
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, layout in selected.items():
            w = params[name]
            groups.setdefault((layout.shape, layout.out_axis, w.dtype, w.device), []).append(name)
        by_kind: dict[tuple[Any, ...], list[Group]] = {}
        for (_, _, dtype, device), names in groups.items():
            by_kind.setdefault((dtype, device), []).append(Group(tuple(names), selected[names[0]]))
        buckets: list[Bucket] = []
        for (dtype, device), gs in by_kind.items():
            cdtype = compute_dtype_for(dtype, self.compute_dtype)
            for members, batched in choose_buckets(
                gs,
                costs=cost_model_for(device),
                flops=self._flops(),
                itemsize=itemsize(cdtype),
                pad=self.pad_exact,
                mode=self.batching,
            ):
                k = max(g.k for g in members)
                n = max(g.n for g in members)
                buckets.append(Bucket(tuple(members), k, n, batched, dtype, cdtype))
        return Plan(tuple(selected.items()), tuple(buckets), gains)

    # ------------------------------------------------------------------ selection

    def _select(self, params: Params) -> dict[str, Layout]:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> Tensor, got {type(params).__name__}")
        selected: dict[str, Layout] = {}
        for name, tensor in params.items():
            if name.endswith(GAIN_SUFFIX):
                continue
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"params[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}"
                )
            if not selects(self.include, name, tensor):
                continue
            check_weight(tensor, f"params[{name!r}] (selected by include)")
            axis = check_out_axis(self.out_axes.get(name, 0), tensor, f"params[{name!r}]")
            selected[name] = layout_of(tensor.shape, axis)
        if isinstance(self.include, frozenset):
            missing = sorted(self.include - set(params))
            if missing:
                raise ValueError(
                    f"include names {missing} are not in params (params from another model? "
                    "A tied weight is in named_parameters() once, under its first name: "
                    "AON.for_module(model) finds ties)"
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
                _check_gain_entry(name, gain, params, selected)
        return selected

    def plan(self, params: Params, state: Mapping[str, Tensor] | None = None) -> Plan:
        """How :meth:`apply` runs on this input structure: the selected tensors and the buckets.

        Each :class:`~aon_func.Bucket` is one call of the batched kernel over
        one or more groups of same-shaped tensors, zero-padded to a common
        ``k x N`` (``docs/performance.md``, "The engine"). The plan depends only
        on names, shapes, dtypes and devices, and is cached: this is the one
        :meth:`apply` uses. Validates like :meth:`apply`.

        Example:
            >>> import torch, aon_func
            >>> params = {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}
            >>> plan = aon_func.AON(batching="vmap").plan(params)
            >>> [(b.size, b.k, b.n) for b in plan.buckets]
            [(2, 64, 64)]
        """
        return self._plan(params, state)

    def select(self, params: Params) -> dict[str, Layout]:
        """The tensors this transform normalises, with their matrix layouts.

        Raises ``ValueError``/``TypeError`` for a selected tensor that cannot
        be normalised, a name in ``include``/``out_axes`` that ``params``
        lacks, or a selection that matches nothing.
        """
        return dict(self._plan(params, None).selected)

    def _cdtype(self, tensor: Tensor) -> torch.dtype:
        return compute_dtype_for(tensor.dtype, self.compute_dtype)

    # ------------------------------------------------------------------ the kernel

    def _kernel(self, *, stateless: bool) -> KernelFn:
        """The batched kernel ``(z, u, fallback, gain) -> (h, u_new)`` this transform runs."""
        raise NotImplementedError

    def _flops(self) -> Flops:
        """Forward FLOPs of the kernel on one ``k x N`` matrix (for the bucket cost model)."""
        return flops_per_matrix(2)

    # ------------------------------------------------------------------ state

    def init(self, params: Params, *, generator: torch.Generator | None = None) -> State:
        """Initial state: one unit vector ``u`` per normalised tensor (none for stateless maps).

        Stateless transforms return ``{}``; see :meth:`AON.init` for AON's.
        """
        check_generator(generator)
        self.select(params)
        return {}

    def check_state(
        self,
        params: Params,
        state: State | Mapping[str, Tensor],
        selected: Mapping[str, Layout] | None = None,
    ) -> None:
        """Raise a clear error unless ``state`` fits ``params`` under this transform.

        It checks keys, shapes, dtypes and devices; a state taken from another
        model of the same architecture fits and cannot be told apart.
        """
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
        when the weight does; ``init`` must be finite and ``> 0``. ``params``
        itself is not modified.

        Example:
            >>> import torch, aon_func
            >>> params = {"fc.weight": torch.randn(4, 8), "fc.bias": torch.zeros(4)}
            >>> p = aon_func.AON().add_gains(params, init=2.0)
            >>> sorted(p)
            ['fc.bias', 'fc.weight', 'fc.weight:gain']
        """
        value = check_gain(init, "init")
        out = dict(params)
        for name in self.select(params):
            w = params[name]
            g = torch.full((), value, dtype=w.dtype, device=w.device)
            out[gain_key(name)] = g.requires_grad_(w.requires_grad)
        return out

    # ------------------------------------------------------------------ apply

    def apply(
        self, params: Params, state: State | None = None, *, training: bool = True
    ) -> tuple[dict[str, Tensor], State]:
        """Normalised weights for the whole model, and the advanced state. Pure.

        The first call for an input structure (names, shapes, dtypes,
        devices) checks the input (see :meth:`select` and :meth:`check_state`:
        bad input fails here with a message that names the tensor, never
        inside the kernel) and plans the batched kernel calls; later calls
        reuse the plan. Nothing is changed in place.

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
        check_bool(training, "training")
        plan = self._plan(params, state)
        computed, new_u = execute(
            plan,
            self._kernel(stateless=state is None),
            params,
            state if self.stateful else None,
            gain=self.gain,
            gain_key=gain_key,
            vmap=self.batching == "vmap",
        )
        weights = {n: computed.get(n, t) for n, t in params.items() if not n.endswith(GAIN_SUFFIX)}
        if not self.stateful:
            return weights, {}
        if state is not None and not training:
            return weights, dict(state)
        # The keys in the order of the given state (init's order when there is none), not the
        # plan's: torch.compile guards on a dict's key order, so a new order would recompile.
        order = state if state is not None else dict(plan.selected)
        return weights, {n: new_u[n] for n in order}

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
        cls: type[_T],
        module: nn.Module,
        *,
        exclude: Iterable[str] = (),
        tied: Literal["skip", "normalise"] = "skip",
        **options: Any,
    ) -> _T:
        """A transform that normalises the weights of ``module``'s linear maps.

        Selects the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` and
        ``ConvTranspose1d/2d/3d`` (output axis 1), the input projections of
        ``MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``;
        its ``out_proj`` is a ``Linear``), Hugging Face's ``Conv1D`` (output
        axis 1, recognised by name: ``transformers`` is not imported) and the
        layers added with :func:`aon_func.register_layer`. Embeddings and
        normalisation layers are skipped; timm's weight-standardised
        convolutions (``StdConv2d``, ...) are skipped with a warning, as
        their forward would undo the normalisation. ``exclude`` lists
        parameter names to leave alone (e.g. the classifier head).

        Tied weights (one tensor at several names, ``named_parameters(remove_duplicate=False)``)
        are selected once, under the name ``named_parameters()`` gives, and
        the normalised tensor is used at every name. A tensor tied to a use
        that is not a selected layer (an output layer tied to the token
        embedding, as in GPT-2 and BERT) is left alone with ``tied="skip"``
        (the default: embeddings are not normalised, so neither is the head
        that shares their tensor), and normalised in both places with
        ``tied="normalise"``. ``exclude`` and ``out_axes`` accept any of a
        tensor's names.

        Example:
            >>> import torch, aon_func
            >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            >>> sorted(aon_func.AON.for_module(net, exclude=["2.weight"]).include)
            ['0.weight']
            >>> lm = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10)})
            >>> lm.head.weight = lm.emb.weight  # tied
            >>> sorted(aon_func.AON.for_module(lm, tied="normalise").include)
            ['emb.weight']
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"module must be a torch.nn.Module, got {type(module).__name__}; for a dict of "
                "parameters, construct the transform directly (AON(include=...))"
            )
        if "include" in options:
            raise TypeError(
                "for_module chooses include itself; pass exclude=[names] to leave weights out, "
                "or construct the transform directly to choose include"
            )
        include, out_axes = choose_module_weights(
            module, exclude=exclude, tied=tied, out_axes=options.pop("out_axes", {})
        )
        return cls(include=include, out_axes=out_axes, **options)


_PLANS: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()


@dataclasses.dataclass(frozen=True, kw_only=True)
class AON(WeightTransform):
    r"""Approximated orthonormal normalisation of a whole model, as a pure transform.

    Each selected weight ``W`` becomes ``g * h(W)`` with ``h`` the AON map of
    :func:`aon_func.aon` (order ``K``); ``order=0`` is spectral normalisation.

    Args:
        order: Taylor order ``K >= 0``.
        n_power_iterations: power-iteration steps per :meth:`apply` (for
            ``order >= 1`` at least ``SAFEGUARD_ITERATIONS`` steps run on the
            Gram matrix, see :func:`aon_func.aon`).
        init_iterations: power iterations :meth:`init` runs to warm ``u`` up.
        matmul_dtype: dtype of the operands of the Gram, Horner and final
            products (default ``None``: the compute dtype); ``torch.bfloat16``
            runs them in bf16 with float32 accumulation, the state and all
            else staying in the compute dtype (see :func:`aon_func.aon` and
            ``docs/performance.md``, "Precision").
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
    matmul_dtype: torch.dtype | None = None

    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonneg_int(self.order, "order")
        check_nonneg_int(self.n_power_iterations, "n_power_iterations")
        check_nonneg_int(self.init_iterations, "init_iterations")
        check_matmul_dtype(self.matmul_dtype)

    def _kernel(self, *, stateless: bool) -> KernelFn:
        iterations = (
            max(self.n_power_iterations, STATELESS_POWER_ITERATIONS)
            if stateless
            else self.n_power_iterations
        )
        order, eps, matmul_dtype = self.order, self.eps, self.matmul_dtype

        def fn(
            z: Tensor, u: Tensor, fallback: Tensor, eye: Tensor, gain: Tensor | float | None
        ) -> tuple[Tensor, Tensor]:
            return aon_matrix(
                z,
                u,
                order=order,
                n_power_iterations=iterations,
                eps=eps,
                fallback=fallback,
                eye=eye,
                gain=gain,
                matmul_dtype=matmul_dtype,
            )

        return fn

    def _flops(self) -> Flops:
        return flops_per_matrix(self.order)

    def init(self, params: Params, *, generator: torch.Generator | None = None) -> State:
        """One unit vector ``u`` per normalised tensor, drawn from ``generator`` and warmed up.

        Each ``u`` is a Gaussian draw (same seed, same state), then
        ``init_iterations`` power iterations on the ``k x k`` Gram matrix of
        the prescaled weight (64 by default, as in the stateless mode: enough
        for the spectral estimate of a freshly initialised layer to be within
        about 1e-3 of ``s_max``, so the first training steps already see unit
        spectral norm). The result does not depend on the weight's scale:
        ``init(c * W)`` gives ``init(W)``'s vectors for any ``c > 0`` the dtype
        holds. ``params`` is not modified.

        For an ensemble (parameters stacked on a leading axis), ``vmap`` of
        ``init`` is not possible (random draws under ``vmap``): init each
        member's parameters and stack the states, see ``docs/usage.md``.
        """
        check_generator(generator)
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
                ).to(w.device)
                if k > 0:  # a matrix with no rows has an empty state
                    fallback = start_vector(k, cdtype, w.device).unsqueeze(-1)
                    u = repair_state(u.unsqueeze(-1), fallback).squeeze(-1)
                if k > 0 and layout.matrix_shape[1] > 0:
                    z = prescale(to_matrix(w.detach(), layout).to(cdtype))
                    u = power_iterate(z @ z.mT, u.unsqueeze(-1), self.init_iterations).squeeze(-1)
                state[name] = u.clone()
        return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class Polar(WeightTransform):
    """Exact orthonormal factor ``U V^T`` by SVD (orthogonal weight normalisation, OWN).

    Stateless (``init`` returns ``{}``); the ``K -> inf`` limit of AON. Its
    gradient uses the polar factor's own derivative, finite at tied singular
    values (an orthogonal initialisation); the zero matrix maps to zero.

    Example:
        >>> import torch, aon_func
        >>> w, _ = aon_func.Polar().apply({"weight": torch.randn(3, 5)})
        >>> torch.allclose(w["weight"] @ w["weight"].T, torch.eye(3), atol=1e-5)
        True
    """

    pad_exact: ClassVar[bool] = False

    def _kernel(self, *, stateless: bool) -> KernelFn:
        def fn(
            z: Tensor, u: Tensor, fallback: Tensor, eye: Tensor, gain: Tensor | float | None
        ) -> tuple[Tensor, Tensor]:
            h = polar_matrix(z)
            return (h if gain is None else h * gain), u

        return fn

    def _flops(self) -> Flops:
        return lambda k, n: 22.0 * k * k * n + 4.0 * k * k * n


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

    def _kernel(self, *, stateless: bool) -> KernelFn:
        iterations = self.iterations

        def fn(
            z: Tensor, u: Tensor, fallback: Tensor, eye: Tensor, gain: Tensor | float | None
        ) -> tuple[Tensor, Tensor]:
            h = oni_matrix(z, iterations)
            return (h if gain is None else h * gain), u

        return fn

    def _flops(self) -> Flops:
        it = self.iterations
        return lambda k, n: 4.0 * k * k * n + 6.0 * it * k**3


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

    def _kernel(self, *, stateless: bool) -> KernelFn:
        steps = self.steps

        def fn(
            z: Tensor, u: Tensor, fallback: Tensor, eye: Tensor, gain: Tensor | float | None
        ) -> tuple[Tensor, Tensor]:
            h = newton_schulz_matrix(z, steps)
            return (h if gain is None else h * gain), u

        return fn

    def _flops(self) -> Flops:
        st = self.steps
        return lambda k, n: st * (4.0 * k * k * n + 2.0 * k**3)

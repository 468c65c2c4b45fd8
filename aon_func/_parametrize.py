"""Module adapter: the whole-model transforms as ``torch.nn.utils.parametrize`` parametrizations.

For ordinary training loops (``module(x)``, ``loss.backward()``,
``torch.optim``): :func:`parametrize` registers, on every tensor a transform
selects, a parametrization whose ``forward`` is that transform's own
:meth:`~aon_func.WeightTransform.apply` on the one tensor, so it runs the same
engine and kernel and gives the same weights as ``apply`` from the same state.
:func:`remove_parametrizations` bakes the normalised weights in for inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from ._checks import check_gain, compute_dtype_for, describe
from ._select import parameter_aliases
from ._transform import AON, State, WeightTransform, gain_key

__all__ = ["WeightParametrization", "parametrize", "remove_parametrizations"]

_KEY = "weight"
_HALF = (torch.float16, torch.bfloat16)


class WeightParametrization(nn.Module):
    """``W -> g * h(W)`` for one tensor, with ``h`` the map of a :class:`~aon_func.WeightTransform`.

    Made by :func:`parametrize`; not meant to be built by hand. For a stateful
    transform (:class:`~aon_func.AON`) the power-iteration vector is the
    buffer ``u`` (saved in ``state_dict``). In training mode it advances each
    time the weight is computed: at each read of the weight, or once per
    ``torch.nn.utils.parametrize.cached()`` block; in eval mode it is left
    alone. The buffer is updated in place after ``h(W)`` is computed from a
    copy, so the autograd graph of ``h(W)`` never sees the update (and, being
    an in-place update of a buffer, it is not for ``torch.func`` transforms:
    use the functional API there). A learnable gain is the parameter ``gain``.

    Args:
        transform: the transform whose map this runs.
        out_axis: the output axis of the tensor.
        u: the initial power-iteration vector (``None`` for stateless transforms).
        gain: initial value of a learnable gain, or ``None`` for none.
        like: the tensor to be parametrized (the gain takes its dtype and device).
    """

    u: Tensor | None
    gain: nn.Parameter | None

    def __init__(
        self,
        transform: WeightTransform,
        *,
        out_axis: int,
        u: Tensor | None,
        gain: float | None,
        like: Tensor,
    ) -> None:
        super().__init__()
        self._shape = like.shape
        self.transform = dataclasses.replace(
            transform, include=frozenset({_KEY}), out_axes={_KEY: out_axis}
        )
        if transform.stateful:
            if u is None:
                raise ValueError(f"{type(transform).__name__} is stateful: u must be given")
            self.register_buffer("u", u.detach().clone())
        else:
            self.register_buffer("u", None)
        if gain is None:
            self.gain = None
        else:
            self.gain = nn.Parameter(
                torch.full((), float(gain), dtype=like.dtype, device=like.device),
                requires_grad=like.requires_grad,
            )

    def _apply(self, fn: Any, recurse: bool = True) -> WeightParametrization:
        # ``module.half()`` / ``.to(torch.bfloat16)`` would cast ``u`` too, but the
        # kernel keeps it in the compute dtype (float32 for half weights): cast it
        # from its old value to that dtype (float32 bits are kept as they are).
        u = self.u
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        new = self.u
        if u is not None and new is not None and new.dtype != u.dtype and new.dtype in _HALF:
            cdtype = compute_dtype_for(new.dtype, self.transform.compute_dtype)
            self.u = u.to(device=new.device, dtype=cdtype)
        return self

    def forward(self, weight: Tensor) -> Tensor:
        """``g * h(weight)``; in training mode ``u`` advances, as in ``apply(..., training=True)``."""
        params = {_KEY: weight}
        if self.gain is not None:
            params[gain_key(_KEY)] = self.gain
        u = self.u
        if u is None:
            weights, _ = self.transform.apply(params, {})
            return weights[_KEY]
        if not self.training:
            weights, _ = self.transform.apply(params, {_KEY: u}, training=False)
            return weights[_KEY]
        # The kernel may save the given u for backward (n_power_iterations=0):
        # hand it a copy, so that updating the buffer cannot break the graph.
        weights, new_state = self.transform.apply(params, {_KEY: u.clone()}, training=True)
        with torch.no_grad():
            u.copy_(new_state[_KEY])
        return weights[_KEY]

    def right_inverse(self, value: Tensor) -> Tensor:
        """Assignment ``module.weight = W`` stores ``W`` as the raw weight (reading gives ``g * h(W)``).

        As for ``torch.nn.utils.parametrizations.spectral_norm``: ``h`` is not
        inverted. ``W`` must keep the weight's shape (and dtype: torch checks it).
        """
        if not isinstance(value, Tensor):
            raise TypeError(f"the assigned weight must be a Tensor, got {type(value).__name__}")
        if value.shape != self._shape:
            raise ValueError(
                f"the assigned weight must have shape={tuple(self._shape)} (the parametrized "
                f"weight's), got {describe(value)}"
            )
        return value

    def extra_repr(self) -> str:
        t = self.transform
        return f"{type(t).__name__}, out_axis={t.out_axes[_KEY]}, learnable_gain={self.gain is not None}"


def parametrize(
    module: nn.Module,
    *,
    transform: WeightTransform | None = None,
    state: State | None = None,
    generator: torch.Generator | None = None,
    learnable_gain: float | None = None,
    **options: Any,
) -> nn.Module:
    """Normalise ``module``'s weights in place with ``torch.nn.utils.parametrize``.

    Each tensor that ``transform`` selects (by default
    ``AON.for_module(module, **options)``: Linear, Conv, ConvTranspose and
    attention projections) gets a :class:`WeightParametrization`, so that
    ``module.<name>`` is ``g * h(W)`` computed from the raw tensor, now at
    ``module.parametrizations.<name>.original``. The parameter objects are
    kept, so an optimiser made before the call still updates them (a
    learnable gain is a new parameter: make the optimiser after).

    From the same state, ``module(x)`` in training mode computes the same
    weights as ``transform.apply(params, state)`` and advances each ``u`` the
    same way; in eval mode, as ``apply(..., training=False)``. Each read of a
    parametrized weight computes it again (and, in training mode, advances
    its ``u``); inside ``with torch.nn.utils.parametrize.cached():`` each is
    computed once. Use it around the forward of modules that read a weight
    more than once: ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer``)
    reads ``in_proj_weight`` three times per forward.

    Args:
        module: changed in place, and returned.
        transform: which tensors and which map; default
            ``AON.for_module(module, **options)``.
        state: initial state (from ``transform.init``); default a fresh
            ``transform.init(params, generator=generator)``.
        generator: for the default state.
        learnable_gain: initial value of a learnable scalar gain per
            normalised tensor (an ``nn.Parameter`` of its parametrization),
            or ``None`` for none.
        **options: passed to :meth:`AON.for_module` (``order``,
            ``n_power_iterations``, ``exclude``, ``gain``, ...); only
            without ``transform``.

    Returns:
        ``module``.

    Example:
        >>> import torch, aon_func
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> _ = aon_func.parametrize(net, order=2, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.linalg.matrix_norm(net[0].weight, ord=2)), 3)
        1.0
    """
    if transform is None:
        transform = AON.for_module(module, **options)
    elif options:
        raise TypeError(
            f"parametrize got both transform and options {sorted(options)}; "
            "set the options on the transform instead"
        )
    if not isinstance(transform, WeightTransform):
        raise TypeError(f"transform must be a WeightTransform, got {type(transform).__name__}")
    if learnable_gain is not None:
        learnable_gain = check_gain(learnable_gain, "learnable_gain", optional=True)
    if any(isinstance(m, WeightParametrization) for m in module.modules()):
        raise ValueError(
            "module is already parametrized by aon_func.parametrize; "
            "call aon_func.remove_parametrizations(module) first"
        )
    params = dict(module.named_parameters())
    aliases = parameter_aliases(module)
    _check_tied_names(transform, aliases)
    selected = transform.select(params)
    if state is None:
        state = transform.init(params, generator=generator)
    else:
        transform.check_state(params, state, selected)
    for name, layout in selected.items():
        p = WeightParametrization(
            transform,
            out_axis=layout.out_axis,
            u=state.get(name),
            gain=learnable_gain,
            like=params[name],
        )
        # A tied tensor gets the same parametrization at each of its names:
        # the raw tensor stays shared, and every use reads g * h(W).
        for alias in aliases.get(name, (name,)):
            owner_name, _, tensor_name = alias.rpartition(".")
            torch_parametrize.register_parametrization(
                module.get_submodule(owner_name), tensor_name, p
            )
        # Registration runs forward (shape checks), which advanced u in
        # training mode: put the given state back.
        if p.u is not None:
            with torch.no_grad():
                p.u.copy_(state[name])
    return module


def _check_tied_names(transform: WeightTransform, aliases: dict[str, tuple[str, ...]]) -> None:
    """A tied tensor must be named by its canonical name (``named_parameters()``'s)."""
    names = transform.include if isinstance(transform.include, frozenset) else frozenset()
    canonical = {a: c for c, group in aliases.items() for a in group[1:]}
    for name in sorted(names | set(transform.out_axes)):
        if name in canonical:
            c = canonical[name]
            raise ValueError(
                f"{name!r} is tied: it is the same tensor as {c!r} (all its names: "
                f"{list(aliases[c])}); name it {c!r}, the name named_parameters() gives, and it "
                "is normalised once and used at every name"
            )


def remove_parametrizations(module: nn.Module) -> nn.Module:
    """Bake the normalised weights into ``module`` and remove the parametrizations.

    Every tensor parametrized by :func:`parametrize` becomes a plain
    parameter holding ``g * h(W)`` as eval mode computes it (``u`` not
    advanced), the same parameter object as the original, so the module
    runs without any of this library's code. Other parametrizations on the
    same tensor are removed with it (``torch.nn.utils.parametrize`` removes
    a tensor's parametrizations together).

    Raises ``ValueError`` if ``module`` holds none.

    Example:
        >>> import torch, aon_func
        >>> net = aon_func.parametrize(torch.nn.Sequential(torch.nn.Linear(8, 4)))
        >>> w = net.eval()[0].weight.detach()
        >>> net = aon_func.remove_parametrizations(net)
        >>> type(net[0]).__name__, torch.equal(net[0].weight, w)
        ('Linear', True)
    """
    found = False
    baked: set[int] = set()  # ids of the parametrizations already baked in (tied tensors)
    for sub in list(module.modules()):
        if not torch_parametrize.is_parametrized(sub):
            continue
        plist = sub.parametrizations
        if not isinstance(plist, nn.ModuleDict):
            continue
        for tensor_name in list(plist.keys()):
            ours = [
                p for p in plist[tensor_name].children() if isinstance(p, WeightParametrization)
            ]
            if not ours:
                continue
            found = True
            for p in ours:
                p.eval()
            # A tied tensor's raw parameter is shared: bake it once, then only
            # unregister at its other names (baking again would apply h twice).
            again = any(id(p) in baked for p in ours)
            baked.update(id(p) for p in ours)
            torch_parametrize.remove_parametrizations(
                sub, tensor_name, leave_parametrized=not again
            )
    if not found:
        raise ValueError("module has no parametrization made by aon_func.parametrize")
    return module

"""Which tensors a transform normalises: ``include`` rules, and the linear maps of a module (a registry of layer types)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

__all__ = [
    "TIED_POLICIES",
    "FrozenDict",
    "Include",
    "LayerRule",
    "choose_module_weights",
    "layer_rule",
    "module_layers",
    "module_weights",
    "normalise_include",
    "parameter_aliases",
    "register_layer",
    "selects",
]

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


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How :meth:`~aon_func.WeightTransform.for_module` treats one layer type.

    Attributes:
        out_axis: the output (neuron) axis of the layer's weights.
        weights: the names of the layer's parameters to normalise (a name
            whose value is ``None``, such as ``MultiheadAttention``'s unused
            ``q_proj_weight``, is passed over); empty to leave the layer alone.
        reason: why the layer is left alone, for the warning
            :meth:`~aon_func.WeightTransform.for_module` gives (only with
            empty ``weights``); ``None`` for no warning.
    """

    out_axis: int
    weights: tuple[str, ...]
    reason: str | None = None


_STD_CONV = (
    "standardises its weight inside forward, after the normalisation, which undoes it "
    "(timm's weight standardisation); normalise it yourself, or use a plain Conv2d"
)

# Layer types by class or by qualified name (``module.QualName``): a name needs
# no import, so a library that is not installed is never imported to check.
_REGISTRY: dict[type[nn.Module] | str, LayerRule] = {
    nn.Linear: LayerRule(0, ("weight",)),
    nn.Conv1d: LayerRule(0, ("weight",)),
    nn.Conv2d: LayerRule(0, ("weight",)),
    nn.Conv3d: LayerRule(0, ("weight",)),
    nn.ConvTranspose1d: LayerRule(1, ("weight",)),
    nn.ConvTranspose2d: LayerRule(1, ("weight",)),
    nn.ConvTranspose3d: LayerRule(1, ("weight",)),
    nn.MultiheadAttention: LayerRule(
        0, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    ),
    # Hugging Face's Conv1D (GPT-2, GPT-J's ancestors): a Linear with its weight stored (in, out).
    "transformers.pytorch_utils.Conv1D": LayerRule(1, ("weight",)),
    # timm's weight-standardised convolutions (ResNetV2/BiT, NFNets): Conv2d subclasses.
    "timm.layers.std_conv.StdConv2d": LayerRule(0, (), _STD_CONV),
    "timm.layers.std_conv.StdConv2dSame": LayerRule(0, (), _STD_CONV),
    "timm.layers.std_conv.ScaledStdConv2d": LayerRule(0, (), _STD_CONV),
    "timm.layers.std_conv.ScaledStdConv2dSame": LayerRule(0, (), _STD_CONV),
}

_M = TypeVar("_M", bound="type[nn.Module] | str")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(
    cls: _M, *, out_axis: int = 0, weights: Sequence[str] = ("weight",), reason: str | None = None
) -> _M:
    """Tell :meth:`~aon_func.WeightTransform.for_module` (and so :func:`~aon_func.parametrize`) about a layer type.

    A module is matched by its class or the nearest base class in the
    registry (so subclasses of ``nn.Linear`` are Linear unless registered
    themselves), by the class object or by its qualified name
    ``"package.module.ClassName"``. A name lets you register a layer of a
    library without importing it: that is how Hugging Face's ``Conv1D``
    (``"transformers.pytorch_utils.Conv1D"``, output axis 1) and timm's
    weight-standardised convolutions (left alone, with a warning) are
    registered. Registering a class again replaces its rule. Built in:
    ``Linear``, ``Conv1d/2d/3d`` (axis 0), ``ConvTranspose1d/2d/3d`` (axis 1),
    ``MultiheadAttention`` (``in_proj_weight``, ``q/k/v_proj_weight``).

    Args:
        cls: an ``nn.Module`` subclass, or its qualified name.
        out_axis: the output (neuron) axis of the weights, ``>= 0``: 0 for a
            weight stored ``(out, in, ...)``, 1 for one stored ``(in, out)``.
        weights: the names of the parameters to normalise; ``()`` to leave the
            layer alone (for example a layer that re-normalises its weight in
            its forward).
        reason: with ``weights=()``, why: :meth:`for_module` then warns, naming
            the layers it leaves alone and this reason.

    Returns:
        ``cls``, so that it can be used as ``register_layer(MyLayer, out_axis=1)``
        right after the class definition.

    Example:
        >>> import torch, aon_func
        >>> class Dense(torch.nn.Module):  # weight stored (in, out), as in JAX/Keras
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.kernel = torch.nn.Parameter(torch.randn(n_in, n_out))
        ...     def forward(self, x):
        ...         return x @ self.kernel
        >>> _ = aon_func.register_layer(Dense, out_axis=1, weights=("kernel",))
        >>> net = torch.nn.Sequential(Dense(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> aon = aon_func.AON.for_module(net)
        >>> sorted(aon.include), dict(aon.out_axes)
        (['0.kernel', '2.weight'], {'0.kernel': 1})
    """
    if isinstance(cls, str):
        if "." not in cls or not all(part.isidentifier() for part in cls.split(".")):
            raise ValueError(
                f"register_layer: cls as a name must be a qualified class name "
                f"'package.module.ClassName', got {cls!r}"
            )
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"register_layer: cls must be an nn.Module subclass or its qualified name, got {cls!r}"
        )
    if isinstance(out_axis, bool) or not isinstance(out_axis, int) or out_axis < 0:
        raise ValueError(f"register_layer: out_axis must be an int >= 0, got {out_axis!r}")
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(
            f"register_layer: weights must be a sequence of parameter names, got {weights!r} "
            "(one name? write weights=('name',))"
        )
    names = tuple(weights)
    bad = [w for w in names if not isinstance(w, str) or not w.isidentifier()]
    if bad:
        raise ValueError(f"register_layer: weights must be parameter names, got {bad!r}")
    if reason is not None and (names or not isinstance(reason, str)):
        raise ValueError(
            "register_layer: reason is the message for a layer left alone: a str, only with weights=()"
        )
    _REGISTRY[cls] = LayerRule(out_axis, names, reason)
    return cls


def layer_rule(module: nn.Module) -> LayerRule | None:
    """The registry's rule for ``module``: its class's, or its nearest registered base class's."""
    for klass in type(module).__mro__:
        rule = _REGISTRY.get(klass)
        if rule is None:
            rule = _REGISTRY.get(_qualname(klass))
        if rule is not None:
            return rule
    return None


def module_weights(module: nn.Module) -> dict[str, int]:
    """The weights of ``module``'s registered layers (see :func:`register_layer`), with their output axes.

    Every path of a module that appears at several paths is listed (a tied
    tensor is then listed under each of its names): the caller maps names to
    parameters.
    """
    return module_layers(module)[0]


def module_layers(module: nn.Module) -> tuple[dict[str, int], dict[str, str]]:
    """``(weights, skipped)``: the weights to normalise with their output axes, and the
    modules left alone by a rule with a ``reason`` (path -> reason)."""
    names: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        rule = layer_rule(sub)
        if rule is None:
            continue
        if rule.reason is not None:
            skipped[prefix or "(the module itself)"] = f"{type(sub).__name__} {rule.reason}"
        dot = f"{prefix}." if prefix else ""
        for pname in rule.weights:
            if not hasattr(sub, pname):
                where = f"module {prefix!r}" if prefix else "the module"
                raise ValueError(
                    f"{where} ({type(sub).__name__}) has no attribute {pname!r}, "
                    f"which register_layer names as one of its weights {list(rule.weights)}"
                )
            if isinstance(getattr(sub, pname), Tensor):
                names[dot + pname] = rule.out_axis
    return names, skipped


def parameter_aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of each parameter of ``module``, by its canonical name.

    The canonical name is the one ``module.named_parameters()`` gives (the
    first path to the tensor); a tied tensor (one ``nn.Parameter`` reached
    through several paths, e.g. GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) has several names, the canonical one first.
    """
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: tuple(names) for names in by_id.values()}


TIED_POLICIES = ("skip", "normalise")


def choose_module_weights(
    module: nn.Module,
    *,
    exclude: Iterable[str],
    tied: str,
    out_axes: Mapping[str, int],
) -> tuple[frozenset[str], dict[str, int]]:
    """``(include, out_axes)`` for :meth:`~aon_func.WeightTransform.for_module`, by canonical names.

    A tensor is chosen when a registered layer uses it. A tied tensor that is
    also used where no registered layer is (an embedding) is left alone with
    ``tied="skip"`` and normalised, once, for all its uses with
    ``tied="normalise"``. Names in ``exclude`` and ``out_axes`` may be any
    name of a tensor; they are mapped to its canonical name.
    """
    if tied not in TIED_POLICIES:
        raise ValueError(f"tied must be one of {list(TIED_POLICIES)}, got {tied!r}")
    layers, skipped = module_layers(module)
    if skipped:
        shown = ", ".join(f"{path!r}" for path in list(skipped)[:4])
        more = f" and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        warnings.warn(
            f"for_module leaves {len(skipped)} layer(s) alone ({shown}{more}): "
            f"{next(iter(skipped.values()))}",
            UserWarning,
            stacklevel=3,
        )
    aliases = parameter_aliases(module)
    canonical = {alias: name for name, names in aliases.items() for alias in names}
    chosen: dict[str, int] = {}
    left_tied: set[str] = set()
    for name, names in aliases.items():
        uses = {n: layers[n] for n in names if n in layers}
        if not uses:
            continue
        if len(set(uses.values())) > 1 and module.get_parameter(name).ndim > 2:
            raise ValueError(
                f"parameter {name!r} is tied (the same tensor at {list(names)}) and its layers "
                f"disagree on its output axis {uses}; pass out_axes={{{name!r}: axis}}"
            )
        if len(uses) < len(names) and tied == "skip":
            left_tied.add(name)
            continue
        chosen[name] = next(iter(uses.values()))
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = set(exclude)
    unknown = sorted(n for n in exclude if canonical.get(n) not in chosen.keys() | left_tied)
    if unknown:
        raise ValueError(
            f"exclude names {unknown} are not weights that for_module selects: {sorted(chosen)}"
        )
    for n in exclude:
        chosen.pop(canonical[n], None)
    axes = {n: a for n, a in chosen.items() if a != 0}
    if not isinstance(out_axes, Mapping):
        raise TypeError(f"out_axes must be a mapping name -> int, got {type(out_axes).__name__}")
    for n, a in out_axes.items():
        axes[canonical.get(n, n)] = a
    return frozenset(chosen), axes

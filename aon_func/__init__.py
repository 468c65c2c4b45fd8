"""aon_func: approximated orthonormal normalisation (AON) of weights, on torch.func.

AON (Zhang, Niwa, Kleijn, arXiv 1911.09445) maps a weight ``W`` to
``h(W) = SN(P_K(W W^T) W)``, with ``P_K`` the order-``K`` Taylor polynomial of
``(W W^T)^(-1/2)`` and SN spectral normalisation: the rows of ``h(W)`` are
pushed towards orthonormality by an amount fixed by ``K``.

Public API:

- :func:`aon`: the kernel, one tensor at a time.
- :class:`AON`: the whole-model transform (``init``/``apply``/``functional_call``),
  and its neighbours on the same engine: :class:`Polar`, :class:`ONI`,
  :class:`NewtonSchulz` (spectral normalisation is ``AON(order=0)``).
- Models: :func:`register_layer` (layer types beyond ``torch.nn`` for
  :meth:`AON.for_module`), and :mod:`aon_func.nn`'s ``aon_norm`` (one tensor,
  in the style of torch's ``spectral_norm``).
- References: :func:`singular_value_map`, :func:`certified_error`,
  :func:`polar`, :func:`orthogonality_error`.
"""

from . import nn
from ._kernel import (
    DEFAULT_ORDER,
    SAFEGUARD_ITERATIONS,
    SIGMA_HAT_FLOOR,
    STATELESS_POWER_ITERATIONS,
    aon,
)
from ._layout import Layout
from ._parametrize import parametrize, remove_parametrizations
from ._penalties import soft_orthogonality_penalty, srip_penalty
from ._plan import Bucket, Group, Plan
from ._reference import certified_error, orthogonality_error, polar, singular_value_map
from ._select import register_layer
from ._transform import (
    AON,
    GAIN_SUFFIX,
    ONI,
    NewtonSchulz,
    Polar,
    WeightTransform,
    gain_key,
)

__version__ = "0.2.0"

__all__ = [
    "AON",
    "DEFAULT_ORDER",
    "GAIN_SUFFIX",
    "ONI",
    "SAFEGUARD_ITERATIONS",
    "SIGMA_HAT_FLOOR",
    "STATELESS_POWER_ITERATIONS",
    "Bucket",
    "Group",
    "Layout",
    "NewtonSchulz",
    "Plan",
    "Polar",
    "WeightTransform",
    "__version__",
    "aon",
    "certified_error",
    "gain_key",
    "nn",
    "orthogonality_error",
    "parametrize",
    "polar",
    "register_layer",
    "remove_parametrizations",
    "singular_value_map",
    "soft_orthogonality_penalty",
    "srip_penalty",
]

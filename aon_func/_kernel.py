"""The AON kernel, natively batched: stacks of oriented matrices ``(..., k, N)`` in, their images out.

One implementation serves a single ``k x N`` matrix, a stack ``(B, k, N)`` (the
engine's buckets) and ``torch.func.vmap`` over either: every operation is a
batched matrix product, a reduction over the last axes or an elementwise op,
with per-matrix scalars kept as ``(..., 1, 1)`` tensors.

Everything here is pure: no in-place change of inputs, no ``.item()``, no
Python branching on tensor values, no randomness. It runs under
``torch.func.vmap`` (default ``randomness='error'``), ``grad``, grad-of-grad,
``jacrev``/``jacfwd`` and ``torch.compile(fullgraph=True)``.

Safeguards (see ``docs/failure-modes.md``): the input is prescaled by its
largest entry (scale invariance over the dtype's range, ``h(0) = 0`` with a
zero gradient), the power-iteration state is repaired when zero or not
finite, ``K >= 1`` runs at least :data:`SAFEGUARD_ITERATIONS` iterations on
the Gram matrix, and ``sigma`` and ``sigma_hat`` have floors that a
converged state never reaches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._checks import (
    check_bool,
    check_eps,
    check_nonneg_int,
    check_out_axis,
    check_u,
    check_weight,
    compute_dtype_for,
)
from ._layout import Layout, from_matrix, layout_of, to_matrix

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_ORDER",
    "MATMUL_DTYPES",
    "SAFEGUARD_ITERATIONS",
    "SIGMA_HAT_FLOOR",
    "STATELESS_POWER_ITERATIONS",
    "aon",
    "aon_matrix",
    "call_function",
    "check_matmul_dtype",
    "gram_iterations",
    "power_iterate",
    "prescale",
    "repair_state",
    "start_vector",
    "taylor_coefficients",
    "vmap_innermost",
]

DEFAULT_ORDER = 1
"""Default Taylor order K (see docs/results.md for the evidence behind it)."""

DEFAULT_EPS = 1e-12
"""Floor of norms and of ``sigma`` in spectral normalisation (``order=0``), as torch's ``eps``."""

STATELESS_POWER_ITERATIONS = 64
"""Power iterations used when no ``u`` is given (the stateless mode), and by ``AON.init``.

For ``order >= 1`` they run on the ``k x k`` Gram matrix, which the kernel
forms anyway, at ``2 k^2`` FLOPs each. Measured by
``scripts/stateless_iterations.py``: see docs/algorithm.md, "The stateless mode".
"""

SAFEGUARD_ITERATIONS = 12
"""Least number of Gram iterations per call for ``order >= 1`` (when ``n_power_iterations >= 1``).

A stale ``u`` underestimates ``sigma``, which puts singular values of
``Z / sigma`` outside the Taylor series' region (``s < sqrt(2)``). Twelve
iterations on the Gram bring a ``u`` whose overlap with the top singular
subspace is ``1e-3`` close enough that ``||h||_2 <= 1.05`` for ``K = 1..8``
(docs/failure-modes.md has the measurements). They cost ``24 k^2`` FLOPs,
next to the ``4 k^2 N`` of the kernel's two products.
"""

SIGMA_HAT_FLOOR = 0.5
"""Floor of the post-normalisation estimate ``sigma_hat`` (``order >= 1``).

With a converged ``u``, ``sigma_hat = f_K(1) = 1`` exactly, so the floor never
acts there; it keeps a degenerate state (``u`` orthogonal to the top
singular vectors) from dividing by a near-zero or negative estimate.
"""

_RENORM_EVERY = 8  # power-iteration steps between two rescalings of the iterate
_SCALE_ITERATE_K = 512  # CPU: from this k on, scale each iterate by 1 / ||M||_F instead of M


MATMUL_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
"""The accepted ``matmul_dtype`` values besides ``None`` (float16 is refused, as for ``compute_dtype``)."""


def check_matmul_dtype(value: object) -> torch.dtype | None:
    """``None`` or one of :data:`MATMUL_DTYPES`: the dtype of the kernel's matrix products' operands.

    float16 is refused: the Gram of a prescaled ``k x N`` matrix has entries
    up to ``N``, and its square up to ``N^2``, beyond float16's 65504.
    """
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(
            f"matmul_dtype must be None or a torch.dtype (torch.bfloat16, torch.float32, "
            f"torch.float64), got {value!r} ({type(value).__name__})"
        )
    if value not in MATMUL_DTYPES:
        raise TypeError(
            f"matmul_dtype={value} is not supported: expected None (the compute dtype), "
            "torch.bfloat16 (bf16 operands, float32 accumulation), torch.float32 or torch.float64"
            + (
                " (float16's range is too narrow for the Gram and its square)"
                if value == torch.float16
                else ""
            )
        )
    return value


def taylor_coefficients(order: int) -> tuple[float, ...]:
    """``c_j = binom(2j, j) / 4^j`` for ``j = 0..order``: the series of ``(1 - e)^(-1/2)``."""
    c = [1.0]
    for j in range(1, order + 1):
        c.append(c[-1] * (2 * j - 1) / (2 * j))
    return tuple(c)


def start_vector(k: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A fixed, deterministic unit vector of length ``k`` with no zero entry.

    The stateless mode starts from it, and a zero or non-finite state is
    replaced by it. Its entries ``1 + 0.5 cos(2.39996 i)`` (golden angle) are
    all positive and irregular, so the vector is orthogonal to the top
    singular vector of no matrix but specially built ones.
    """
    i = torch.arange(k, dtype=dtype, device=device)
    x = 1.0 + 0.5 * torch.cos(2.399963229728653 * i)
    return x / torch.linalg.vector_norm(x)


# ----------------------------------------------------------------------------- building blocks


def prescale(z: Tensor) -> Tensor:
    """``Z / max_ij |Z_ij|`` per matrix, the scale a constant for autograd (both modes); ``0`` stays 0.

    Every map here is scale-invariant, so this changes neither the output
    nor its derivative, and keeps ``Z Z^T`` and the norms in range for any
    finite weight (``h(c W) = h(W)`` from the smallest normal float to the
    largest). For the zero matrix (and one whose largest entry is subnormal)
    the factor is 0, so its output and gradient are exactly zero; NaN and Inf
    entries still propagate.
    """
    with torch.no_grad():
        # no_grad leaves forward-mode AD on; detach makes the scale a constant there too.
        zd = z.detach()
        if z.device.type == "cpu":
            # The inf-norm kernel is 20x slower there; amax and amin read Z without
            # writing |Z| (NaN propagates through both and through maximum).
            d = (-2, -1)
            a = torch.maximum(zd.amax(dim=d, keepdim=True), zd.amin(dim=d, keepdim=True).neg_())
        else:
            a = torch.linalg.vector_norm(zd, ord=math.inf, dim=(-2, -1), keepdim=True)
        inv = a.reciprocal().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # -0.0 from amin
    return z * inv


def repair_state(u: Tensor, fallback: Tensor) -> Tensor:
    """``u / |u|``, or ``fallback`` where ``u`` is zero or not finite. Shapes ``(..., k, 1)``.

    ``u`` is first divided by its largest entry, so any finite non-zero
    vector (``1e-30`` or ``1e30`` alike) keeps its direction. The fallback is
    the start vector of the matrix's own length.
    """
    with torch.no_grad():
        a = torch.linalg.vector_norm(u, ord=math.inf, dim=-2, keepdim=True)
        d = u / a
        n = torch.linalg.vector_norm(d, dim=-2, keepdim=True)
        # n is in [1, sqrt(k)] for a finite non-zero u, NaN otherwise (0/0, inf/inf, NaN).
        return torch.where(n >= 1, d / n, fallback)


def power_iterate(m: Tensor, u: Tensor, steps: int, fro: Tensor | None = None) -> Tensor:
    """``steps`` power-iteration steps ``u <- normalize(M u)`` for symmetric ``M`` (the only loop).

    ``M`` (``(..., k, k)``, no gradient) is first divided by its Frobenius
    norm ``fro`` (computed when not given), so ``|M u| <= |u|`` and nothing
    overflows (on the CPU, for ``k >= 512``, each product is divided
    instead: the same bound without a pass over ``M``); the iterate is
    rescaled every few steps, so nothing underflows. Returns the unit
    result, or ``u`` itself where the iterate vanished or is not finite (zero
    or NaN weights: a bad step does not poison the state). AON runs it on a power of the Gram ``Z Z^T``
    (:func:`aon_matrix`, ``AON.init``), SRIP on ``Z Z^T - I``.
    """
    if steps == 0:
        return u
    with torch.no_grad():
        if fro is None:
            fro = torch.linalg.vector_norm(m, dim=(-2, -1), keepdim=True)
        x = u
        # On the CPU a pass over a large M costs more than scaling each iterate
        # (docs/performance.md); elsewhere each scaling would be one more launch.
        if m.device.type == "cpu" and m.shape[-1] >= _SCALE_ITERATE_K:
            mn, inv = m, fro.reciprocal()
        else:
            mn, inv = m / fro, None
        for t in range(steps):
            x = mn @ x if inv is None else (mn @ x) * inv
            if t % _RENORM_EVERY == _RENORM_EVERY - 1 and t != steps - 1:
                x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        n = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return torch.where(n > 0, x / n, u)


def gram_iterations(n_power_iterations: int) -> int:
    """Gram iterations the kernel runs for ``order >= 1``: at least :data:`SAFEGUARD_ITERATIONS`.

    ``0`` stays ``0`` (use the given ``u`` as it is).
    """
    return max(n_power_iterations, SAFEGUARD_ITERATIONS) if n_power_iterations > 0 else 0


def _gram_power(device: torch.device, order: int, iterations: int) -> int:
    """Which power ``G^p`` of the Gram the iteration runs on: ``p`` steps in one product.

    ``G^2`` is a product Horner needs anyway for ``K >= 2``; on accelerators,
    where a launch costs more than a ``k x k`` product, ``G^4`` too (one
    product, three quarters of the launches saved). The iterate is
    ``G^T u`` up to rounding whichever the power.
    """
    if iterations < 4:
        return 1
    if device.type != "cpu":
        return 4 if iterations % 4 == 0 else 2 if iterations % 2 == 0 else 1
    return 2 if order >= 2 and iterations % 2 == 0 else 1


def _to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, without a call when it is already (a call is host time on a GPU)."""
    return x if x.dtype == dtype else x.to(dtype)


def _mm_in(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` with the operands in ``dtype`` (the product dtype), the result in ``a``'s dtype."""
    if dtype == a.dtype:
        return _mm(a, b)
    return _to(_mm(_to(a, dtype), _to(b, dtype)), a.dtype)


def _addmm(c: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float) -> Tensor:
    """``beta c + alpha a @ b`` in one fused call, for one matrix or a stack."""
    if a.ndim == 2 and c.ndim <= 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    if a.ndim == 3:
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
    return beta * c + alpha * (a @ b)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; ``bmm`` for stacks (its backward is two ``bmm``, matmul's adds reshapes)."""
    return torch.bmm(a, b) if a.ndim == 3 and b.ndim == 3 else a @ b


def call_function(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)``, without binding default arguments, in plain eager code.

    ``torch.autograd.Function.apply`` binds ``forward``'s default arguments
    with ``inspect.signature`` on every call, then unwraps dead ``torch.func``
    wrappers and calls the C++ ``apply``; skipping the binding saved 14 us
    per call on small matrices and 50-100 us on 512x512 to 1024x1024 ones on
    the project's CPU (docs/performance.md). The kernel's functions (and the
    polar factor's) have no default arguments, so outside ``torch.func``
    transforms and ``torch.compile`` this does the last two steps only;
    inside them it calls ``fn.apply``.
    """
    if _unwrap_dead is None or torch.compiler.is_compiling() or _transforms_active():
        return fn.apply(*args)  # type: ignore[no-untyped-call]
    return super(torch.autograd.Function, fn).apply(*_unwrap_dead(args))  # type: ignore[misc]


def vmap_innermost() -> bool:
    """Whether the innermost active ``torch.func`` transform is ``vmap``.

    A custom Function's ``jvp`` returns ``None`` for the outputs it marks
    non-differentiable, except when torch's generated vmap rule calls it (forward
    mode over ``vmap``): that rule asserts on ``None`` and needs zero tangents
    (pytorch/pytorch#90067). ``tests/test_kernel_transforms.py`` runs both.
    """
    if _peek_interpreter is None or _peek_interpreter() is None:
        return False
    return bool(_current_interpreter().key() == _VMAP)


try:  # what Function.apply does before the C++ apply (torch >= 2.1; tests/test_kernel_transforms.py
    # pins the names that Function.apply uses, so a torch that adds a step fails there)
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead

    _transforms_active = torch._C._are_functorch_transforms_active
except (ImportError, AttributeError):  # pragma: no cover - other torch versions take Function.apply
    _unwrap_dead = None  # type: ignore[assignment]

try:  # the functorch interpreter stack (torch >= 2.1)
    from torch._C._functorch import TransformType as _TransformType
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter
    from torch._functorch.pyfunctorch import (
        retrieve_all_functorch_interpreters as _all_interpreters,
    )
    from torch._functorch.pyfunctorch import (
        retrieve_current_functorch_interpreter as _current_interpreter,
    )

    _VMAP, _JVP = _TransformType.Vmap, _TransformType.Jvp
except (ImportError, AttributeError):  # pragma: no cover
    _peek_interpreter = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- Gram and Z v


def _gram_state(
    z: Tensor, u: Tensor, fallback: Tensor, iterations: int, power: int, squared: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(G, G^2, Z v, u, w, floor)``.

    The Gram ``G = Z Z^T`` and, when ``squared``, ``G^2`` (else an empty
    tensor), then :func:`_iterate` on them. ``z`` may be in a narrower product
    dtype than ``u`` (the compute dtype).
    """
    gram = _to(_mm(z, z.mT), u.dtype)
    with torch.no_grad():
        g2 = _mm_in(gram, gram, z.dtype) if squared or power >= 2 else gram.new_empty(0)
        u, w, zv, floor = _iterate(gram, g2, u, fallback, iterations, power)
    return gram, g2, zv, u, w, floor


def _iterate(
    gram: Tensor, g2: Tensor, u: Tensor, fallback: Tensor, iterations: int, power: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(u, w, Z v, floor)`` from the Gram ``G`` and ``g2`` (``G^2`` or empty; no gradient).

    The state after ``iterations`` Gram steps (run as ``iterations / power``
    steps on ``G^power``); ``w = u / |Z^T u|``; ``Z v = G w`` with
    ``v = Z^T w`` (no pass over ``Z`` but the product); and the floor of
    ``sigma``.

    The floor is ``max(sqrt(||G||_F^2 / tr G), 1) / 2``. Since
    ``sum s^4 / sum s^2 <= s_max^2`` and ``s_max >= 1`` after prescaling, it is
    at most ``s_max / 2``: a converged ``sigma`` never meets it. It depends only
    on the singular values (orthogonal equivariance holds) and not on ``k``
    (zero padding stays exact), and it keeps ``s_max / sigma <= 2 sqrt(k)``
    whatever ``u`` is, so ``h`` stays finite.
    """
    fro = torch.linalg.vector_norm(gram, dim=(-2, -1), keepdim=True)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
    # fmax: 0 * inf = NaN for the zero matrix gives the other operand, 1/2.
    floor = torch.fmax(fro * (4.0 * trace).rsqrt(), torch.full_like(fro, 0.5))
    u = repair_state(u, fallback)
    if power == 1:
        u = power_iterate(gram, u, iterations, fro)
    elif power == 2:
        u = power_iterate(g2, u, iterations // 2, fro * fro)
    else:
        u = power_iterate(g2 @ g2, u, iterations // 4, (fro * fro) ** 2)
    gu = gram @ u
    inv_n = (u.mT @ gu).rsqrt().nan_to_num(posinf=0.0)  # 1 / |Z^T u|, 0 for Z = 0
    return u, u * inv_n, gu * inv_n, floor


def _forward_mode() -> bool:
    """Forward-mode AD is on: a ``torch.func`` ``jvp``/``jacfwd`` level or a dual level.

    There the kernel runs plain differentiable ops instead of its custom
    Functions, whose derivatives are first order only in forward mode (a
    custom ``jvp`` is not differentiated again): ``jvp`` of ``jvp``,
    ``jacfwd`` of ``jacfwd`` and ``jacrev`` of ``jacfwd`` are then right.
    """
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if _peek_interpreter is None or _peek_interpreter() is None:
        return False
    return any(i.key() == _JVP for i in _all_interpreters())


class _GramZv(torch.autograd.Function):
    """``(Z Z^T, (Z Z^T)^2, Z v)`` with ``v = Z^T u / n`` constant, and a one-product backward.

    Autograd through ``z @ z.mT``, its square and ``z @ v`` would run two
    ``k x k @ k x N`` products for the Gram, an outer product ``dzv v^T`` and
    two ``k x N`` sums. Since ``v = Z^T u / n``, ``dzv v^T = (dzv u^T / n) Z``,
    so the whole gradient is one product ``(D + D^T + dzv w^T) Z`` with
    ``D = dG + dG2 G + G dG2`` and ``w = u / n``. ``u`` and ``w`` are constants
    for autograd (the power iteration's); ``Z`` and ``G`` are saved (``G`` as an output, so the
    backward is differentiable: grad-of-grad); ``vmap`` uses the generated
    rule; forward mode runs :func:`_gram_zv_plain` instead (no ``jvp`` here).
    ``Z`` may be in a narrower product dtype (``matmul_dtype``) than ``u``:
    the products run in ``Z``'s dtype, the Gram and all else in ``u``'s.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: Tensor, u: Tensor, fallback: Tensor, iterations: int, power: int, squared: bool
    ) -> tuple[Tensor, ...]:
        return _gram_state(z, u, fallback, iterations, power, squared)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        z = inputs[0]
        gram, _, _, u, w, floor = output
        ctx.mark_non_differentiable(u, w, floor)
        ctx.set_materialize_grads(False)
        ctx.squared = inputs[5]
        ctx.save_for_backward(z, w, gram)

    @staticmethod
    def backward(
        ctx: Any, dg: Tensor | None, dg2: Tensor | None, dzv: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        z, w, gram = ctx.saved_tensors
        if dg2 is not None and ctx.squared:
            d2 = _addmm(_mm(dg2, gram), gram, dg2, beta=1.0, alpha=1.0)
            dg = d2 if dg is None else dg + d2
        if dg is None and dzv is None:
            return None, None, None, None, None, None
        if dg is None:
            dg = torch.zeros_like(gram)
        if dzv is None:
            dzv = torch.zeros_like(w)
        grad: Tensor = call_function(_GramZvGrad, dg, dzv, z, w)
        return grad, None, None, None, None, None


class _GramZvGrad(torch.autograd.Function):
    """``_GramZv``'s gradient ``(D + D^T + dzv w^T) Z`` (``w = u / n``) in one product.

    Its own derivative keeps ``v = Z^T w`` constant, as the forward does: in
    ``Z``, only the ``(D + D^T) Z`` part varies. The ops are differentiable,
    so higher orders work too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dg: Tensor, dzv: Tensor, z: Tensor, w: Tensor) -> Tensor:
        return _mm(_to(dg + dg.mT + dzv @ w.mT, z.dtype), z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        dg, _, z, w = inputs
        ctx.save_for_backward(dg, z, w)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        dg, z, w = ctx.saved_tensors
        a = _to(_mm(dout, z.mT), dg.dtype)
        return a + a.mT, a @ w, _mm(_to(dg + dg.mT, z.dtype), dout), None


def _gram_zv(
    z: Tensor,
    u: Tensor,
    fallback: Tensor,
    iterations: int,
    power: int,
    squared: bool,
    plain: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:class:`_GramZv`, or with ``plain`` (forward mode) :func:`_gram_zv_plain`."""
    if plain:
        return _gram_zv_plain(z, u, fallback, iterations, power, squared)
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] = call_function(
        _GramZv, z, u, fallback, iterations, power, squared
    )
    return out


def _gram_zv_plain(
    z: Tensor, u: Tensor, fallback: Tensor, iterations: int, power: int, squared: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_gram_zv` by differentiable ops (forward mode): the same values, bit for bit.

    ``Z v`` is ``G w`` with ``v = Z^T w`` constant: its value is
    :func:`_iterate`'s, its derivative that of ``Z v``.
    """
    gram = _to(_mm(z, z.mT), u.dtype)
    g2 = _mm_in(gram, gram, z.dtype) if squared else gram.new_empty(0)
    with torch.no_grad():  # detach: no tangent reaches the state (forward mode)
        u, fallback, gd = u.detach(), fallback.detach(), gram.detach()
        g2d = g2.detach() if squared else _mm_in(gd, gd, z.dtype) if power >= 2 else g2
        u, w, zv0, floor = _iterate(gd, g2d, u, fallback, iterations, power)
        v = _mm(z.detach().mT, _to(w, z.dtype))
    zv = _to(_mm(z, v), u.dtype)
    return gram, g2, zv - zv.detach() + zv0, u, w, floor


class _ScaledMm(torch.autograd.Function):
    """``h = (P s) Z`` for a ``k x k`` factor ``P`` and a per-matrix scalar ``s``, keeping ``P``, ``s``, ``Z``.

    Autograd of ``(P * s) @ Z`` would keep the scaled factor ``P s`` as well
    as ``P``: one more ``k x k`` tensor per matrix, as large as the weight
    for a square one. The backward rebuilds ``P s`` (one elementwise pass)
    for ``dZ = (P s)^T dh``; ``d(P s) = dh Z^T`` is the one other product,
    as in autograd. ``Z`` may be in a narrower product dtype than ``P`` (the
    ``matmul_dtype`` option): the products run in ``Z``'s dtype, ``P``, ``s``
    and their gradients stay in the compute dtype. The backward is made of
    differentiable ops, so grad-of-grad works; ``vmap`` uses the generated
    rule; forward mode runs the plain product instead, as for :class:`_GramZv`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(p: Tensor, s: Tensor, z: Tensor) -> Tensor:
        return _to(_mm(_to(p * s, z.dtype), z), p.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        p, s, z = ctx.saved_tensors
        need_p, need_s, need_z = ctx.needs_input_grad[:3]
        dp = ds = dz = None
        if need_p or need_s:
            dps = _to(_mm(_to(dh, z.dtype), z.mT), p.dtype)
            if need_p:
                dp = dps * s
            if need_s:
                ds = (dps * p).sum(dim=(-2, -1), keepdim=True)
                ds = ds if ds.shape == s.shape else ds.sum_to_size(s.shape)
        if need_z:
            dz = _mm(_to(p * s, z.dtype).mT, _to(dh, z.dtype))
        return dp, ds, dz


def _scaled_mm(p: Tensor, s: Tensor, z: Tensor, plain: bool) -> Tensor:
    """``(p * s) @ z`` in ``z``'s dtype, the result in ``p``'s, keeping only ``p``, ``s``, ``z``.

    ``plain`` (forward mode): the same product by plain autograd, which keeps ``p * s`` too.
    """
    if plain:
        return _to(_mm(_to(p * s, z.dtype), z), p.dtype)
    h: Tensor = call_function(_ScaledMm, p, s, z)
    return h


# ----------------------------------------------------------------------------- the kernels


def _spectral_normalisation(
    z: Tensor, u: Tensor, fallback: Tensor, iterations: int, eps: float
) -> tuple[Tensor, Tensor]:
    """Miyato's loop ``v = normalize(Z^T u); u = normalize(Z v)``, ``iterations`` times.

    ``(u_new, sigma)`` with ``sigma = u^T Z v`` differentiable in ``Z`` and
    ``u, v`` constant: step for step ``torch.nn.utils.parametrizations.spectral_norm``.
    The last ``Z v`` is shared between the iteration and ``sigma``.
    """

    def unit(x: Tensor) -> Tensor:
        return x / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(eps)

    def step(x: Tensor, keep: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return torch.where(n > eps, x / n.clamp_min(eps), keep)

    with torch.no_grad():  # detach: u and v are constants in forward mode too
        zd = z.detach()
        u = repair_state(u, fallback)
        for _ in range(iterations - 1):
            u = step(zd @ unit(zd.mT @ u), u)
        v = unit(zd.mT @ u)
    zv = z @ v
    if iterations > 0:
        with torch.no_grad():
            u = step(zv.detach(), u)
    return u, u.mT @ zv


def _horner(
    gram: Tensor,
    g2: Tensor,
    s1: Tensor,
    order: int,
    eye: Tensor,
    dtype: torch.dtype,
    *,
    fused: bool = False,
) -> tuple[Tensor, float]:
    """``(P, a)`` with ``a P = P_K(s1 G) = sum_j c_j (I - s1 G)^j`` (``a`` a Python number).

    ``P_K`` is only needed up to a positive factor (the post-normalisation
    divides it out), so the identity terms become a plain ``I`` (``eye``, a
    constant) and their coefficients go into ``a``. With ``X = s1 G``:
    ``K = 1`` is ``(c_0 + c_1) (I - c_1 / (c_0 + c_1) X)``, one ``addcmul``;
    for ``K >= 2`` the first two Horner steps are ``A I + B X + C X^2``, two
    ``addcmul`` with ``G^2`` (which the power iteration shares), and each
    further step is ``P <- c_j I + (I - X) P``, one ``baddbmm`` (its
    operands in ``dtype``, the product dtype): ``K - 1`` products in all,
    counting ``G^2``.

    ``fused`` (the CPU, where an elementwise pass over ``k x k`` costs more
    than a call; ``g2`` is then not given): ``X = s1 G`` once, the first two
    steps are one ``baddbmm(X, X, X)`` and each further step
    ``baddbmm(P, X, P, alpha=-1)``, with the identity terms added on the
    diagonal of each fresh product in place: one pass over ``k x k`` per
    step instead of two or three, the same products.
    """
    c = taylor_coefficients(order)
    if order == 1:
        a = c[0] + c[1]
        return torch.addcmul(eye, gram, s1, value=-c[1] / a), a
    a = c[order - 2] + c[order - 1] + c[order]
    b = -(c[order - 1] + 2 * c[order]) / a
    if fused:
        x = gram * s1
        p = _addmm(x, x, x, beta=b, alpha=c[order] / a)  # b X + c_K / a X^2
        p.diagonal(dim1=-2, dim2=-1).add_(1.0)  # a fresh tensor: not an input
        for j in range(order - 3, -1, -1):
            p = _addmm(p, x, p, beta=1.0, alpha=-1.0)  # (I - X) P, then + c_j / a I
            p.diagonal(dim1=-2, dim2=-1).add_(c[j] / a)
        return p, a
    p = torch.addcmul(torch.addcmul(eye, gram, s1, value=b), g2, s1 * s1, value=c[order] / a)
    if order > 2:
        q = torch.addcmul(eye, gram, s1, value=-1.0)  # I - X
        for j in range(order - 3, -1, -1):
            # c_j I + (I - X) a P = a (c_j / a I + (I - X) P): the factor a carries over.
            if dtype == p.dtype:
                p = _addmm(eye, q, p, beta=c[j] / a, alpha=1.0)
            else:
                p = torch.add(_mm_in(q, p, dtype), eye, alpha=c[j] / a)
    return p, a


def aon_matrix(
    z: Tensor,
    u: Tensor,
    *,
    order: int,
    n_power_iterations: int,
    eps: float = DEFAULT_EPS,
    fallback: Tensor | None = None,
    eye: Tensor | None = None,
    gain: Tensor | float | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """AON of a stack of oriented matrices ``z`` ``(..., k, N)`` (``k <= N``), in ``z``'s dtype.

    ``u`` is the state ``(..., k)``; ``fallback`` (``(..., k)``) the start
    vectors that replace a zero or non-finite state (default
    :func:`start_vector`); ``eye`` the ``k x k`` identity in ``z``'s dtype
    (a cached constant, made when not given); ``gain`` a fixed number or a
    ``(..., 1, 1)`` tensor multiplied into ``h``; ``matmul_dtype`` the
    dtype of the Gram, Horner and final products' operands (default
    ``z``'s; see :func:`check_matmul_dtype`). Returns ``(h, u_new)``. No
    validation: callers check at the boundary. ``order >= 1`` runs
    :func:`gram_iterations` steps on the Gram.

    Cost per matrix: ``2 k^2 N`` (Gram) ``+ 2 (K-1) k^3`` (Horner) ``+ 2 k^2 N``
    (product) ``+ 2 k^2`` per power iteration; the backward is ``2K + 1``
    products of those sizes (see ``_GramZv`` and ``_ScaledMm``). Autograd
    keeps the prescaled ``Z`` and ``k x k`` tensors: the Gram, ``P``, and
    for ``K >= 2`` the Gram's square (``K >= 3``: and the Horner iterates).
    """
    k, n_cols = z.shape[-2], z.shape[-1]
    if k == 0 or n_cols == 0:
        return z * 1.0, u * 1.0
    ucol = u.unsqueeze(-1)
    fb = (start_vector(k, z.dtype, z.device) if fallback is None else fallback).unsqueeze(-1)
    zs = prescale(z)
    if order == 0:
        u_new, sigma = _spectral_normalisation(zs, ucol, fb, n_power_iterations, eps)
        scale = sigma.clamp_min(eps).reciprocal()
        h = zs * (scale if gain is None else scale * gain)
        return h, u_new.squeeze(-1)
    if _autocast_on(z.device):
        # The kernel chooses its own precision (matmul_dtype); autocast would round the
        # Gram and its square to the low dtype, beyond what the safeguards assume.
        with torch.autocast(z.device.type, enabled=False):
            return _aon_products(zs, ucol, fb, order, n_power_iterations, eye, gain, matmul_dtype)
    return _aon_products(zs, ucol, fb, order, n_power_iterations, eye, gain, matmul_dtype)


def _autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _aon_products(
    zs: Tensor,
    ucol: Tensor,
    fb: Tensor,
    order: int,
    n_power_iterations: int,
    eye: Tensor | None,
    gain: Tensor | float | None,
    matmul_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """:func:`aon_matrix` for ``order >= 1`` after the prescaling (``zs``; ``ucol``, ``fb`` columns)."""
    k = zs.shape[-2]
    if eye is None:
        eye = torch.eye(k, dtype=zs.dtype, device=zs.device)
    pd = zs.dtype if matmul_dtype is None else matmul_dtype
    zp = _to(zs, pd)  # the products' operand, cast once
    iterations = gram_iterations(n_power_iterations)
    # On the CPU Horner's first product is fused (no G^2 before sigma is known), so the
    # power iteration runs on G itself; elsewhere G^2 (and G^4) save launches.
    fused = zs.device.type == "cpu" and pd == zs.dtype and order >= 2
    power = 1 if fused else _gram_power(zs.device, order, iterations)
    squared = order >= 2 and not fused
    # Forward mode takes plain differentiable ops (decided once per call: host time).
    plain = not torch.compiler.is_compiling() and _forward_mode()
    gram, g2, zv, u_new, _, floor = _gram_zv(zp, ucol, fb, iterations, power, squared, plain)
    ut = u_new.mT
    # sigma = u^T Z v = |Z^T u|, differentiable with u, v constant; never below the floor.
    inv_sigma = torch.clamp(_mm(ut, zv), min=floor).reciprocal()
    p, a = _horner(gram, g2, inv_sigma * inv_sigma, order, eye, pd, fused=fused)
    # What = a P Z / sigma; sigma_hat = u^T What v = a (u^T P) (Z v) / sigma. (u^T P
    # first: u is a constant, so autograd keeps a vector, not P.)
    sigma_hat = (_mm(_mm(ut, p), zv) * inv_sigma).clamp_min(SIGMA_HAT_FLOOR / a)
    scale = inv_sigma / sigma_hat if gain is None else inv_sigma * gain / sigma_hat
    # Scale the k x k factor, not the k x N product; autograd keeps P, not P * scale.
    h = _scaled_mm(p, scale, zp, plain)
    return h, u_new.squeeze(-1)


def aon(
    weight: Tensor,
    u: Tensor | None = None,
    *,
    order: int = DEFAULT_ORDER,
    n_power_iterations: int = 1,
    out_axis: int = 0,
    training: bool = True,
    eps: float = DEFAULT_EPS,
    compute_dtype: torch.dtype | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Approximated orthonormal normalisation of one weight tensor.

    .. math::  h(W) = \mathrm{SN}\big(P_K(Z_b Z_b^\top)\, Z_b\big),\quad
               Z_b = Z / \sigma,\quad P_K(S) = \sum_{j=0}^{K} c_j (I - S)^j

    ``Z`` is the matrix view of ``weight`` around ``out_axis`` (transposed when
    tall), ``sigma`` its spectral estimate by power iteration and ``c_j`` the
    Taylor coefficients of ``(1 - e)^{-1/2}``. Each singular value ``s`` of
    ``Z / s_max`` maps to ``f_K(s) = s * sum_j c_j (1 - s^2)^j`` (see
    :func:`singular_value_map`), so the largest becomes 1 and the others move
    towards 1: ``f_1(0.5) = 0.69``, ``f_4(0.5) = 0.90``, ``f_16(0.5) = 0.998``.
    The orthogonality error ``||h h^T - I||_2`` is ``1 - f_K(1/kappa)^2`` for
    a weight of condition number ``kappa`` (:func:`certified_error`).

    Args:
        weight: floating tensor of shape ``(..., d_out, ...)`` with ``ndim >= 2``.
        u: power-iteration state, shape ``(k,)`` with ``k = min(rows, cols)``
            of the matrix view, in the compute dtype. ``None`` is the
            stateless mode: start from a fixed vector and run
            ``max(n_power_iterations, STATELESS_POWER_ITERATIONS)`` iterations.
            A zero or non-finite ``u`` is replaced by that fixed vector.
        order: Taylor order ``K >= 0``; ``0`` is spectral normalisation.
        n_power_iterations: power-iteration steps (``0`` only with a given
            ``u``, used as it is). For ``order >= 1`` at least
            ``SAFEGUARD_ITERATIONS`` (12) steps run on the Gram matrix.
        out_axis: the output (neuron) axis: 0 for Linear/Conv, 1 for ConvTranspose.
        training: when ``False`` the given ``u`` is returned unchanged.
        eps: floor of norms and of ``sigma`` for ``order=0`` (as torch's
            ``eps``), in ``(0, 1e-3]``.
        compute_dtype: dtype of the computation; default float32 for
            float16/bfloat16 weights and the weight's dtype otherwise.
        matmul_dtype: dtype of the operands of the Gram, Horner and final
            products (``order >= 1``); ``None`` (default) is the compute
            dtype. ``torch.bfloat16`` halves their cost on hardware with
            bf16 units (the products accumulate in float32; their results,
            the state ``u`` and everything else stay in the compute dtype):
            ``docs/performance.md``, "Precision", has the accuracy it costs.
            TF32 needs no option: on CUDA, float32 products follow
            ``torch.backends.cuda.matmul.allow_tf32`` /
            ``torch.set_float32_matmul_precision``.

    Returns:
        ``(h, u_new)``: ``h`` has ``weight``'s shape and dtype; ``u_new`` is the
        advanced state (the converged vector in the stateless mode).

    Non-finite weights propagate to ``h`` (as torch's own ops do), while
    ``u_new`` keeps the previous ``u``, so a NaN step does not poison the state.

    Example:
        >>> import torch, aon_func
        >>> w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
        >>> h, u = aon_func.aon(w, order=4)
        >>> s = torch.linalg.svdvals(h)
        >>> s_w = torch.linalg.svdvals(w)
        >>> round(s.max().item(), 4), round(s_w.min().item() / s_w.max().item(), 2), round(s.min().item(), 2)
        (1.0, 0.17, 0.41)
        >>> torch.allclose(s, aon_func.singular_value_map(s_w / s_w.max(), 4), atol=1e-4)
        True
        >>> h2, u2 = aon_func.aon(w, u, order=4)  # stateful: one more step
    """
    weight = check_weight(weight)
    order = check_nonneg_int(order, "order")
    n_power_iterations = check_nonneg_int(n_power_iterations, "n_power_iterations")
    training = check_bool(training, "training")
    eps = check_eps(eps)
    axis = check_out_axis(out_axis, weight)
    layout = layout_of(weight.shape, axis)
    cdtype = compute_dtype_for(weight.dtype, compute_dtype)
    mdtype = check_matmul_dtype(matmul_dtype)
    k = layout.matrix_shape[0]
    if u is None:
        if n_power_iterations == 0:
            raise ValueError(
                "n_power_iterations=0 needs a given u (the stateless mode u=None must iterate); "
                f"got u=None for weight with shape={tuple(weight.shape)}"
            )
        u0 = start_vector(k, cdtype, weight.device)
        iterations = max(n_power_iterations, STATELESS_POWER_ITERATIONS)
    else:
        u0 = check_u(u, k, cdtype, weight.device)
        iterations = n_power_iterations
    h, u_new = aon_tensor(weight, u0, layout, order, iterations, eps, cdtype, mdtype)
    if u is not None and not training:
        u_new = u
    return h, u_new


def aon_tensor(
    weight: Tensor,
    u: Tensor,
    layout: Layout,
    order: int,
    n_power_iterations: int,
    eps: float,
    compute_dtype: torch.dtype,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Unchecked tensor-level kernel: matrix view, cast, AON, back."""
    z = to_matrix(weight, layout).to(compute_dtype)
    h, u_new = aon_matrix(
        z,
        u,
        order=order,
        n_power_iterations=n_power_iterations,
        eps=eps,
        matmul_dtype=matmul_dtype,
    )
    return from_matrix(h, layout).to(weight.dtype), u_new

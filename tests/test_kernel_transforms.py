"""The AON kernel under torch's transforms: vmap, grad, grad-of-grad, jacrev, gradcheck, dtypes.

``torch.compile`` is tested in ``tests/test_compile.py``.

A note on derivatives. As in spectral normalisation, ``u`` and ``v`` are
constants for autograd, so the kernel's derivative is that of ``W -> h(W)``
with the power-iteration vectors frozen. Where they are converged this equals
the derivative of the exact map (``sigma`` and ``sigma_hat`` are stationary in
``u, v``), so first-order checks (``gradcheck``) use a converged ``u``. Second
derivatives of the frozen and the exact map differ (the singular vectors'
curvature), so grad-of-grad is checked against finite differences along
directions that leave the top singular pair unchanged, where the two agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwad
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import aon_func
import aon_func._kernel as kernel
import aon_func._neighbours as neighbours
from aon_func import aon
from aon_func._layout import layout_of, to_matrix

F64 = torch.float64


def spectrum_matrix(
    m: int, n: int, s: tuple[float, ...], seed: int = 0, dtype: torch.dtype = F64
) -> Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U`` (m x k), ``V`` (n x k)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]
    return ((u * torch.tensor(s[:k], dtype=F64)) @ v.T).to(dtype)


def gapped(m: int, n: int, seed: int = 0) -> Tensor:
    """A float64 matrix with singular values 1, 0.6, 0.36, ...: a clear gap under the top one."""
    return spectrum_matrix(m, n, tuple(0.6**i for i in range(min(m, n))), seed)


def top_u(w: Tensor, out_axis: int = 0) -> Tensor:
    z = to_matrix(w, layout_of(w.shape, out_axis % w.ndim))
    return torch.linalg.svd(z, full_matrices=False)[0][:, 0].contiguous()


def unit(k: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    x = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (x / x.norm()).to(dtype)


def k_of(shape: tuple[int, ...], out_axis: int) -> int:
    return layout_of(shape, out_axis % len(shape)).matrix_shape[0]


# ----------------------------------------------------------------------------- vmap


@st.composite
def stacks(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    batch = draw(st.integers(1, 4))
    ndim = draw(st.sampled_from([2, 2, 3, 4]))
    shape = tuple(
        draw(st.lists(st.integers(1, 8 if ndim == 2 else 3), min_size=ndim, max_size=ndim))
    )
    out_axis = draw(st.sampled_from([0, 1, -1]))
    return shape, out_axis, batch


@given(
    sab=stacks(),
    order=st.integers(0, 6),
    iters=st.sampled_from([None, 0, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_vmap_equals_loop(
    sab: tuple[tuple[int, ...], int, int],
    order: int,
    iters: int | None,
    seed: int,
    device: torch.device,
) -> None:
    """``vmap(aon)`` over a stack (weights and states) equals ``aon`` on each, stateless or not."""
    shape, out_axis, batch = sab
    gen = torch.Generator().manual_seed(seed)
    ws = torch.randn(batch, *shape, generator=gen, dtype=F64).to(device)
    k = k_of(shape, out_axis)
    if iters is None:
        hs, us = torch.func.vmap(lambda w: aon(w, order=order, out_axis=out_axis))(ws)
        loop = [aon(w, order=order, out_axis=out_axis) for w in ws]
    else:
        u0 = torch.randn(batch, k, generator=gen, dtype=F64)
        u0 = (u0 / u0.norm(dim=1, keepdim=True)).to(device)
        hs, us = torch.func.vmap(
            lambda w, u: aon(w, u, order=order, n_power_iterations=iters, out_axis=out_axis)
        )(ws, u0)
        loop = [
            aon(w, u, order=order, n_power_iterations=iters, out_axis=out_axis)
            for w, u in zip(ws, u0, strict=True)
        ]
    h_loop = torch.stack([h for h, _ in loop])
    u_loop = torch.stack([u for _, u in loop])
    scale = max(1.0, float(h_loop.abs().max()))
    torch.testing.assert_close(hs, h_loop, atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(us, u_loop, atol=1e-12, rtol=0)


def test_vmap_shared_state_and_nested(device: torch.device) -> None:
    """``in_dims=(0, None)`` (one ``u`` for a stack) and a vmap of a vmap (ensemble of stacks)."""
    gen = torch.Generator().manual_seed(1)
    ws = torch.randn(2, 3, 4, 6, generator=gen, dtype=F64).to(device)
    u = unit(4, 2).to(device)
    f = lambda w, u: aon(w, u, order=3, n_power_iterations=2)  # noqa: E731
    hs, us = torch.func.vmap(torch.func.vmap(f, in_dims=(0, None)), in_dims=(0, None))(ws, u)
    for i in range(2):
        for j in range(3):
            h, u1 = f(ws[i, j], u)
            torch.testing.assert_close(hs[i, j], h, atol=1e-12, rtol=0)
            torch.testing.assert_close(us[i, j], u1, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- grad, jacrev


def _loss(c: Tensor, **kw: object) -> Callable[[Tensor], Tensor]:
    def loss(w: Tensor) -> Tensor:
        h = aon(w, **kw)[0]  # type: ignore[arg-type]
        return (h * c).sum() + (h**3).sum()

    return loss


@pytest.mark.parametrize(
    ("shape", "out_axis"), [((3, 5), 0), ((5, 3), 0), ((4, 2, 3), 1), ((1, 4), 0)]
)
@pytest.mark.parametrize("order", [0, 1, 3])
def test_grad_matches_autograd_and_is_scale_free(
    shape: tuple[int, ...], out_axis: int, order: int, device: torch.device
) -> None:
    """``torch.func.grad`` == ``torch.autograd.grad``; and ``<grad, W> = 0``, since ``h`` is scale-invariant."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen, dtype=F64).to(device)
    c = torch.randn(shape, generator=gen, dtype=F64).to(device)
    u = unit(k_of(shape, out_axis), 4).to(device)
    loss = _loss(c, u=u, order=order, n_power_iterations=1, out_axis=out_axis)
    g = torch.func.grad(loss)(w)
    wr = w.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(loss(wr), wr)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)
    assert abs(float((g * w).sum())) < 1e-10 * max(1.0, float(g.norm() * w.norm()))


@pytest.mark.parametrize(("shape", "out_axis"), [((3, 5), 0), ((4, 2), 0), ((2, 3, 2), 1)])
@pytest.mark.parametrize("order", [0, 2])
def test_jacrev_matches_jacfwd_and_autograd(
    shape: tuple[int, ...], out_axis: int, order: int
) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(shape, generator=gen, dtype=F64)
    u = unit(k_of(shape, out_axis), 6)

    def f(w: Tensor) -> Tensor:
        return aon(w, u, order=order, n_power_iterations=2, out_axis=out_axis)[0]

    jr = torch.func.jacrev(f)(w)
    assert jr.shape == (*shape, *shape)
    torch.testing.assert_close(jr, torch.func.jacfwd(f)(w), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(jr, torch.autograd.functional.jacobian(f, w), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "transform",
    [aon_func.AON(order=1), aon_func.AON(order=2), aon_func.Polar()],
    ids=["aon-1", "aon-2", "polar"],
)
def test_forward_mode_over_vmap(transform: aon_func.WeightTransform) -> None:
    """``jvp`` and ``jacfwd`` through a ``vmap`` (an ensemble, ``batching="vmap"``) match reverse mode.

    The custom Functions' ``jvp`` give zero tangents, not ``None``, for their
    non-differentiable outputs: torch's generated vmap rule asserts on ``None``.
    """
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(2, 4, 6, generator=gen, dtype=F64)
    d = torch.randn(2, 4, 6, generator=gen, dtype=F64)
    one = transform.init({"weight": w[0]})
    state = {k: torch.stack([v, v]) for k, v in one.items()}

    def ensemble(x: Tensor) -> Tensor:
        return torch.func.vmap(transform.apply)({"weight": x}, state)[0]["weight"]

    _, tangent = torch.func.jvp(ensemble, (w,), (d,))
    reference = torch.einsum("abcdef,def->abc", torch.func.jacrev(ensemble)(w), d)
    torch.testing.assert_close(tangent, reference, atol=1e-12, rtol=1e-10)

    mapped = dataclasses.replace(transform, batching="vmap")

    def first(a: Tensor) -> Tensor:
        return mapped.apply({"a.weight": a, "b.weight": w[1]}, None)[0]["a.weight"]

    torch.testing.assert_close(
        torch.func.jacfwd(first)(w[0]), torch.func.jacrev(first)(w[0]), atol=1e-12, rtol=1e-10
    )


@pytest.mark.parametrize("order", [1, 3])
def test_second_derivatives_agree_in_every_mode(order: int) -> None:
    """Forward mode runs plain ops (a custom ``jvp`` is first order only): every nesting agrees."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(3, 5, generator=gen, dtype=F64)
    d = torch.randn(3, 5, generator=gen, dtype=F64)
    u = unit(3, 13)

    def f(x: Tensor) -> Tensor:
        return aon(x, u, order=order)[0]

    rr = torch.func.jacrev(torch.func.jacrev(f))(w)
    assert float(rr.abs().max()) > 0.1
    for name, other in (
        ("jacfwd(jacrev)", torch.func.jacfwd(torch.func.jacrev(f))(w)),
        ("jacrev(jacfwd)", torch.func.jacrev(torch.func.jacfwd(f))(w)),
        ("jacfwd(jacfwd)", torch.func.jacfwd(torch.func.jacfwd(f))(w)),
    ):
        torch.testing.assert_close(other, rr, atol=1e-12, rtol=1e-10, msg=name)

    def directional(x: Tensor) -> Tensor:
        return torch.func.jvp(f, (x,), (d,))[1]

    second = torch.func.jvp(directional, (w,), (d,))[1]
    torch.testing.assert_close(second, torch.einsum("abcdef,cd,ef->ab", rr, d, d))
    primal, _ = torch.func.jvp(f, (w,), (d,))
    assert torch.equal(primal, f(w))  # the plain ops give the same values, bit for bit


@pytest.mark.parametrize("iterations", [0, 1])
def test_the_state_is_a_constant_in_forward_mode_as_in_reverse(iterations: int) -> None:
    """A tangent on ``u`` (jacfwd with respect to the state) reaches neither ``h`` nor ``u_new``."""
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(4, 6, generator=gen, dtype=F64)
    u = unit(4, 15)

    def f(v: Tensor) -> tuple[Tensor, Tensor]:
        return aon(w, v, order=2, n_power_iterations=iterations)

    for jac in (torch.func.jacfwd(f)(u), torch.func.jacrev(f)(u)):
        for j in jac:
            assert torch.equal(j, torch.zeros_like(j))


# ----------------------------------------------------------------------------- gradcheck


GRADCHECK_SHAPES = [
    ((1, 1), 0),
    ((1, 4), 0),
    ((4, 1), 0),
    ((2, 3), 0),
    ((3, 2), 0),
    ((3, 3), 0),
    ((2, 3, 2), 1),
]


@pytest.mark.parametrize(("shape", "out_axis"), GRADCHECK_SHAPES)
@pytest.mark.parametrize("order", [0, 1, 2, 5])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_gradcheck_converged_u(
    shape: tuple[int, ...], out_axis: int, order: int, iters: int, device: torch.device
) -> None:
    """``gradcheck`` in float64 with ``u`` given (converged) and fixed across the perturbations."""
    m = shape[out_axis]
    mat = gapped(m, math.prod(shape) // m, seed=7)
    w = torch.movedim(
        mat.reshape(m, *(d for i, d in enumerate(shape) if i != out_axis)), 0, out_axis
    )
    w = w.contiguous().to(device)
    u = top_u(w, out_axis)

    def f(w: Tensor) -> Tensor:
        return aon(w, u, order=order, n_power_iterations=iters, out_axis=out_axis)[0]

    assert torch.autograd.gradcheck(f, (w.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(("shape", "out_axis"), GRADCHECK_SHAPES)
def test_gradcheck_order_zero_any_u(
    shape: tuple[int, ...], out_axis: int, device: torch.device
) -> None:
    """``K = 0``, ``T = 0``: ``sigma = |Z^T u|`` exactly, so any fixed ``u`` gives exact derivatives."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(shape, generator=gen, dtype=F64).to(device)
    u = unit(k_of(shape, out_axis), 9).to(device)

    def f(w: Tensor) -> Tensor:
        return aon(w, u, order=0, n_power_iterations=0, out_axis=out_axis)[0]

    assert torch.autograd.gradcheck(f, (w.clone().requires_grad_(True),))


@pytest.mark.parametrize(("shape", "out_axis"), [((2, 3), 0), ((4, 3), 0), ((2, 2, 2), 1)])
@pytest.mark.parametrize("order", [0, 3])
def test_gradcheck_stateless(shape: tuple[int, ...], out_axis: int, order: int) -> None:
    """The stateless mode re-converges at each perturbed point (clear spectral gap)."""
    m = shape[out_axis]
    mat = gapped(m, math.prod(shape) // m, seed=10)
    w = torch.movedim(
        mat.reshape(m, *(d for i, d in enumerate(shape) if i != out_axis)), 0, out_axis
    )

    def f(w: Tensor) -> Tensor:
        return aon(w, order=order, out_axis=out_axis)[0]

    assert torch.autograd.gradcheck(f, (w.contiguous().requires_grad_(True),))


# ----------------------------------------------------------------------------- grad of grad


@pytest.mark.parametrize("order", [0, 1, 3])
def test_grad_of_grad_matches_finite_differences(order: int, device: torch.device) -> None:
    """Reverse-over-reverse and forward-over-reverse Hessian-vector products == central differences.

    ``W = U diag(s) V^T`` with ``u`` at its top singular vector; the direction
    ``D`` lives on the other singular vectors, so ``u`` and ``v`` stay exact
    along ``W + t D`` and the frozen-``u, v`` derivative is the true one.
    """
    m, n = 3, 4
    gen = torch.Generator().manual_seed(11)
    uu = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=F64))[0]
    vv = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    s = torch.tensor([1.0, 0.55, 0.3], dtype=F64)
    w = ((uu * s) @ vv[:, :m].T).to(device)
    a = 0.2 * torch.randn(m - 1, n - 1, generator=gen, dtype=F64)
    d = (uu[:, 1:] @ a @ vv[:, 1:].T).to(device)
    c = torch.randn(m, n, generator=gen, dtype=F64).to(device)
    u = uu[:, 0].contiguous().to(device)
    loss = _loss(c, u=u, order=order, n_power_iterations=1)
    grad = torch.func.grad(loss)

    hvp_rev = torch.func.grad(lambda w: (grad(w) * d).sum())(w)  # H is symmetric: H d
    _, hvp_fwd = torch.func.jvp(grad, (w,), (d,))
    t = 1e-5
    hvp_fd = (grad(w + t * d) - grad(w - t * d)) / (2 * t)
    torch.testing.assert_close(hvp_fwd, hvp_fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(hvp_rev, hvp_fwd, atol=1e-10, rtol=1e-8)


def test_grad_of_grad_maml_step_runs(device: torch.device) -> None:
    """A MAML-style outer gradient through an inner SGD step on AON weights is finite."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(4, 6, generator=gen, dtype=F64).to(device)
    x = torch.randn(8, 6, generator=gen, dtype=F64).to(device)
    y = torch.randn(8, 4, generator=gen, dtype=F64).to(device)
    u = unit(4, 13).to(device)

    def inner(w: Tensor) -> Tensor:
        return ((x @ aon(w, u, order=2)[0].T - y) ** 2).mean()

    def outer(w: Tensor) -> Tensor:
        return inner(w - 0.1 * torch.func.grad(inner)(w))

    g = torch.func.grad(outer)(w)
    assert g.shape == w.shape
    assert bool(torch.isfinite(g).all())
    assert float(g.norm()) > 0


# torch.compile: tests/test_compile.py


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (F64, F64),
    ],
)
@pytest.mark.parametrize("order", [0, 2])
def test_dtype_round_trip(
    dtype: torch.dtype, compute: torch.dtype, order: int, device: torch.device
) -> None:
    """``h`` comes back in the weight's dtype, ``u`` in the compute dtype, and ``u`` goes back in."""
    w = spectrum_matrix(6, 10, tuple(0.7**i for i in range(6)), seed=16, dtype=dtype).to(device)
    h, u = aon(w, order=order)
    assert h.dtype == dtype
    assert h.shape == w.shape
    assert u.dtype == compute
    assert u.device == w.device
    h2, u2 = aon(w, u, order=order)
    assert h2.dtype == dtype
    assert u2.dtype == compute
    ref = aon(w.to(F64), order=order)[0]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, F64: 1e-12}[dtype]
    torch.testing.assert_close(h.to(F64), ref, atol=tol, rtol=0)


def test_compute_dtype_override(device: torch.device) -> None:
    """``compute_dtype=float64`` on a float32 weight: float64 state, float32 ``h`` equal to the float64 result."""
    w = spectrum_matrix(5, 7, (1.0, 0.6, 0.5, 0.2, 0.1), seed=17, dtype=torch.float32).to(device)
    h, u = aon(w, order=3, compute_dtype=F64)
    assert h.dtype == torch.float32
    assert u.dtype == F64
    h64, u64 = aon(w.to(F64), order=3)
    assert torch.equal(h, h64.to(torch.float32))
    assert torch.equal(u, u64)


# ----------------------------------------------------------------------------- the direct apply


def _derivatives(w: Tensor, u: Tensor, t: Tensor) -> list[Tensor]:
    """Values, a gradient, a grad-of-grad and a forward-mode derivative of the kernel at ``w``."""
    w = w.detach().requires_grad_()
    h, u_new = aon(w, u, order=3)
    (g,) = torch.autograd.grad((h * t).sum(), w, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), w)
    with fwad.dual_level():
        hd, _ = aon(fwad.make_dual(w.detach(), t), u, order=3)
        tangent = fwad.unpack_dual(hd).tangent
    return [h.detach(), u_new, g.detach(), gg, tangent]


def test_direct_apply_equals_function_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eager code calls the autograd Functions' C++ apply without torch's Python wrapper
    # (_kernel.call_function); it must be the same computation, bit for bit, at every order.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 10, generator=g, dtype=F64)
    u = torch.randn(6, generator=g, dtype=F64)
    t = torch.randn(6, 10, generator=g, dtype=F64)
    wrapper_calls: list[object] = []
    is_defined = torch.autograd.function._is_setup_context_defined

    def counted(fn: object) -> bool:
        wrapper_calls.append(fn)
        return is_defined(fn)

    monkeypatch.setattr(torch.autograd.function, "_is_setup_context_defined", counted)
    direct = _derivatives(w, u, t)
    assert not wrapper_calls  # torch's Python wrapper did not run
    calls: list[str] = []

    def wrapped(fn: type[torch.autograd.Function], *args: object) -> object:
        calls.append(fn.__name__)
        return fn.apply(*args)

    monkeypatch.setattr(kernel, "call_function", wrapped)
    through_apply = _derivatives(w, u, t)
    assert {"_GramZv", "_ScaledMm", "_GramZvGrad"} <= set(calls)
    assert wrapper_calls  # and here it did
    for a, b in zip(direct, through_apply, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_function_apply_does_what_the_direct_call_assumes() -> None:
    # _kernel.call_function skips torch.autograd.Function.apply's default-argument binding and
    # does the rest itself (unwrap dead torch.func wrappers, then the C++ apply). If a
    # torch release adds a step to Function.apply, the names it uses change: review call_function.
    code = torch.autograd.Function.apply.__func__.__code__
    names = set(code.co_names)
    for const in code.co_consts:
        names |= set(getattr(const, "co_names", ()))
    known = {
        "_is_setup_context_defined", "setup_context", "forward", "torch", "_C",
        "_are_functorch_transforms_active", "_functorch", "utils", "unwrap_dead_wrappers",
        "super", "apply", "RuntimeError", "custom_function_call",
        "inspect", "signature", "bind", "apply_defaults", "args", "kwargs",
    }  # fmt: skip
    assert names <= known, f"Function.apply uses new names: {sorted(names - known)}"
    assert kernel._unwrap_dead is not None  # the direct call is in use on this torch
    fns = (kernel._GramZv, kernel._ScaledMm, kernel._GramZvGrad, neighbours._PolarFwd)
    for fn in fns:
        defaults = fn.forward.__defaults__
        assert not defaults, (
            f"{fn.__name__}.forward has default arguments: call_function skips them"
        )

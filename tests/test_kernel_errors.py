"""Bad input to the kernel, and the edge cases it must survive: zeros, NaN/Inf, empty tensors.

Every bad input raises ``TypeError`` or ``ValueError`` before any tensor
computation (checked by recording every torch call made before the raise),
with a message that names the argument, its shape or dtype, and what was
expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import aon_func
from aon_func import aon, certified_error, orthogonality_error, polar, singular_value_map
from aon_func._kernel import start_vector

F64 = torch.float64


class _Recorder(TorchFunctionMode):
    """Records every torch function and tensor method called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        self.calls.append(getattr(func, "__qualname__", repr(func)))
        return func(*args, **(kwargs or {}))


@contextmanager
def raises_before_compute(exc: type[Exception], *words: str) -> Iterator[None]:
    """``pytest.raises(exc)``, the message containing each of ``words``, and no tensor op before it.

    Reading tensor metadata (shape, dtype, device) and printing a tensor into
    the message are allowed; any other torch call before the raise fails the test.
    """
    rec = _Recorder()
    with pytest.raises(exc) as info, rec:
        yield
    # Metadata reads, and printing a tensor into the message.
    metadata = (".__get__", ".dim", ".size", ".__repr__", ".__format__")
    computed = [c for c in rec.calls if not c.endswith(metadata)]
    assert not computed, f"computation before validation: {computed}"
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in the message {msg!r}"


W = torch.randn(3, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- weight


def test_weight_not_a_tensor() -> None:
    with raises_before_compute(TypeError, "weight", "torch.Tensor", "list"):
        aon([[1.0, 2.0], [3.0, 4.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (4,)])
def test_weight_ndim_below_two(shape: tuple[int, ...]) -> None:
    w = torch.ones(shape)
    with raises_before_compute(ValueError, "weight", "ndim >= 2", f"shape={shape}"):
        aon(w)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]
)
def test_weight_not_real_floating(dtype: torch.dtype) -> None:
    w = torch.ones(3, 4, dtype=dtype)
    with raises_before_compute(TypeError, "weight", "floating", f"dtype={dtype}", "shape=(3, 4)"):
        aon(w)


# ----------------------------------------------------------------------------- out_axis


@pytest.mark.parametrize(
    ("shape", "out_axis"), [((3, 5), 2), ((3, 5), -3), ((2, 3, 4, 5), 4), ((2, 3, 4, 5), -5)]
)
def test_out_axis_out_of_range(shape: tuple[int, ...], out_axis: int) -> None:
    nd, w = len(shape), torch.ones(shape)
    with raises_before_compute(
        ValueError, f"out_axis={out_axis}", f"shape={shape}", f"{-nd} <= out_axis < {nd}"
    ):
        aon(w, out_axis=out_axis)


@pytest.mark.parametrize("out_axis", [1.0, True, "0", None])
def test_out_axis_not_an_int(out_axis: object) -> None:
    with raises_before_compute(TypeError, "out_axis", "int"):
        aon(W, out_axis=out_axis)  # type: ignore[arg-type]


def test_negative_out_axis_counts_from_the_end() -> None:
    w = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    for a, b in [(-1, 2), (-2, 1), (-3, 0)]:
        assert torch.equal(aon(w, out_axis=a)[0], aon(w, out_axis=b)[0])


# ----------------------------------------------------------------------------- u


def test_u_wrong_length() -> None:
    u = torch.ones(5) / 5**0.5
    with raises_before_compute(ValueError, "u", "(3,)", "shape=(5,)"):
        aon(W, u)


def test_u_wrong_length_tall_weight() -> None:
    """A tall ``8 x 3`` weight is made orthonormal by columns: its state has length 3, not 8."""
    w, u = torch.ones(8, 3), torch.ones(8)
    with raises_before_compute(ValueError, "u", "(3,)", "shape=(8,)"):
        aon(w, u)


def test_u_wrong_ndim() -> None:
    u = torch.ones(1, 3)
    with raises_before_compute(ValueError, "u", "(3,)", "shape=(1, 3)"):
        aon(W, u)


@pytest.mark.parametrize(
    ("w_dtype", "u_dtype", "expected"),
    [
        (torch.float32, F64, torch.float32),
        (F64, torch.float32, F64),
        (torch.float16, torch.float16, torch.float32),  # half weights carry a float32 state
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float32, torch.int64, torch.float32),
    ],
)
def test_u_wrong_dtype(w_dtype: torch.dtype, u_dtype: torch.dtype, expected: torch.dtype) -> None:
    w = W.to(w_dtype)
    u = torch.ones(3, dtype=u_dtype)
    with raises_before_compute(TypeError, "u", f"dtype {expected}", f"dtype={u_dtype}"):
        aon(w, u)


def test_u_wrong_device(device: torch.device) -> None:
    """``u`` on another device than the weight (the meta device stands in where there is one GPU or none)."""
    w = W.to(device)
    u = torch.ones(3, device="meta")
    with raises_before_compute(ValueError, "u", f"device {w.device}", "device=meta"):
        aon(w, u)
    if device.type == "cuda":
        u = torch.ones(3, device=device)
        with raises_before_compute(ValueError, "u", "device cpu", "device=cuda"):
            aon(W, u)


def test_u_not_a_tensor() -> None:
    with raises_before_compute(TypeError, "u", "torch.Tensor or None", "list"):
        aon(W, [1.0, 0.0, 0.0])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- order, n_power_iterations, eps


@pytest.mark.parametrize("name", ["order", "n_power_iterations"])
def test_negative_int_option(name: str) -> None:
    with raises_before_compute(ValueError, name, "non-negative int", "-1"):
        aon(W, **{name: -1})


@pytest.mark.parametrize("name", ["order", "n_power_iterations"])
@pytest.mark.parametrize("value", [1.0, 2.5, "2", True, None, torch.tensor(2)])
def test_non_int_option(name: str, value: object) -> None:
    with raises_before_compute(TypeError, name, "non-negative int", type(value).__name__):
        aon(W, **{name: value})


@pytest.mark.parametrize("name", ["order", "n_power_iterations"])
def test_numpy_integer_option_accepted(name: str) -> None:
    u = aon(W)[1]
    expected = aon(W, u, **{name: 2})[0]
    assert torch.equal(aon(W, u, **{name: np.int64(2)})[0], expected)


def test_zero_iterations_need_a_given_u() -> None:
    with raises_before_compute(ValueError, "n_power_iterations=0", "u=None", "shape=(3, 5)"):
        aon(W, n_power_iterations=0)


def test_zero_iterations_with_a_given_u() -> None:
    """``T = 0`` with a given ``u``: ``u`` is kept, ``v = normalize(Z^T u)``, ``sigma = |Z^T u|``."""
    u = torch.tensor([1.0, 0.0, 0.0])
    h, u1 = aon(W, u, order=0, n_power_iterations=0)
    assert torch.equal(u1, u)
    torch.testing.assert_close(h, W / W[0].norm())


@pytest.mark.parametrize("eps", [0.0, -1e-12, float("nan"), float("inf"), 2e-3, 1e10])
def test_eps_not_positive_finite(eps: float) -> None:
    with raises_before_compute(ValueError, "eps", "positive", str(eps)):
        aon(W, eps=eps)


@pytest.mark.parametrize("eps", ["1e-12", None, True])
def test_eps_not_a_number(eps: object) -> None:
    with raises_before_compute(TypeError, "eps", "positive float"):
        aon(W, eps=eps)  # type: ignore[arg-type]


@pytest.mark.parametrize("compute_dtype", [torch.int32, torch.bool, torch.complex64, "float64"])
def test_compute_dtype_not_real_floating(compute_dtype: object) -> None:
    with raises_before_compute(TypeError, "compute_dtype", "floating", str(compute_dtype)):
        aon(W, compute_dtype=compute_dtype)  # type: ignore[arg-type]


def test_compute_dtype_float16_rejected() -> None:
    """float16 cannot hold the eps clamp: a zero weight computed in it would give NaN."""
    with raises_before_compute(TypeError, "compute_dtype=torch.float16", "float32"):
        aon(W, compute_dtype=torch.float16)


@pytest.mark.parametrize("order", [0, 1, 4])
def test_compute_dtype_bfloat16_keeps_zero_and_scale(order: int) -> None:
    zero, u = aon(torch.zeros(3, 5), order=order, compute_dtype=torch.bfloat16)
    assert torch.equal(zero, torch.zeros(3, 5))
    assert u.dtype == torch.bfloat16
    h = aon(W, order=order, compute_dtype=torch.bfloat16)[0]
    assert torch.equal(aon(W * 2.0**-40, order=order, compute_dtype=torch.bfloat16)[0], h)


# ----------------------------------------------------------------------------- references


def test_reference_functions_validate_their_input() -> None:
    vec, ints, kappa = torch.ones(3), torch.ones(3, 3, dtype=torch.int64), torch.tensor(2)
    with raises_before_compute(ValueError, "weight", "ndim >= 2"):
        polar(vec)
    with raises_before_compute(TypeError, "weight", "dtype=torch.int64"):
        orthogonality_error(ints)
    with raises_before_compute(ValueError, "out_axis=2"):
        polar(W, out_axis=2)
    with raises_before_compute(ValueError, "order", "-1"):
        singular_value_map(0.5, -1)
    with raises_before_compute(ValueError, "kappa", ">= 1", "0.5"):
        certified_error(0.5, 2)
    with raises_before_compute(TypeError, "kappa", "floating", "torch.int64"):
        certified_error(kappa, 2)


# ----------------------------------------------------------------------------- zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("order", [0, 1, 4])
@pytest.mark.parametrize(
    ("shape", "out_axis"),
    [((1, 1), 0), ((1, 6), 0), ((6, 1), 0), ((4, 6), 0), ((6, 4), 1), ((3, 2, 2, 2), 1)],
)
def test_zero_weight_gives_zeros(
    dtype: torch.dtype, order: int, shape: tuple[int, ...], out_axis: int, device: torch.device
) -> None:
    """``h(0) = 0`` (never NaN), stateless or with a given state, and the state stays finite."""
    w = torch.zeros(shape, dtype=dtype, device=device)
    h, u = aon(w, order=order, out_axis=out_axis)
    assert torch.equal(h, torch.zeros_like(w))
    assert bool(torch.isfinite(u).all())
    h2, u2 = aon(w, u, order=order, n_power_iterations=2, out_axis=out_axis)
    assert torch.equal(h2, torch.zeros_like(w))
    torch.testing.assert_close(u2, u, rtol=0, atol=1e-6)  # kept (normalised again)


@pytest.mark.parametrize(
    "signs", [(1.0, 1.0, 1.0, 1.0), (-1.0, -1.0, -1.0, -1.0), (1.0, -1.0, 1.0, -1.0)]
)
@pytest.mark.parametrize("order", [0, 2])
def test_zero_weight_gradient_is_zero(
    signs: tuple[float, ...], order: int, device: torch.device
) -> None:
    # Negative zeros too: on the CPU the prescaling's largest |entry| comes from
    # amax and -amin, which can be -0.0 (its reciprocal -inf must become 0 as +inf does).
    w = torch.zeros(3, 4, dtype=F64, device=device) * torch.tensor(signs, dtype=F64, device=device)
    w.requires_grad_()
    h, _ = aon(w, order=order)
    t = torch.arange(12.0, dtype=F64, device=device).view(3, 4)
    (g,) = torch.autograd.grad((h * t).sum(), w)
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_zero_weight_forward_mode_derivative_is_zero(order: int) -> None:
    # torch.no_grad() does not stop forward-mode AD: the prescaling's factor must be
    # a constant there too, or its reciprocal's derivative at 0 turns the tangent NaN.
    w = torch.zeros(3, 4, dtype=F64)
    _, tangent = torch.func.jvp(lambda x: aon(x, order=order)[0], (w,), (torch.ones_like(w),))
    assert torch.equal(tangent, torch.zeros_like(w))


@pytest.mark.parametrize("order", [1, 2])
def test_forward_and_reverse_mode_agree_with_a_tied_largest_entry(order: int) -> None:
    # +1 and -1 entries tie for the largest |entry|, and u is orthogonal to the top
    # singular vector (sigma at its floor, h not scale-invariant to first order):
    # jvp and the reverse-mode Jacobian must still give the same derivative.
    w = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]], dtype=F64)
    u = torch.linalg.svd(w)[0][:, 1]  # the second left singular vector
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return aon(x, u, order=order, n_power_iterations=0)[0]

    _, forward = torch.func.jvp(f, (w,), (t,))
    reverse = torch.einsum("abij,ij->ab", torch.func.jacrev(f)(w), t)
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- NaN / Inf policy


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize(("shape", "out_axis"), [((3, 5), 0), ((5, 3), 0), ((2, 3, 2), 1)])
def test_non_finite_weight_propagates_and_keeps_u(
    bad: float, order: int, iters: int, shape: tuple[int, ...], out_axis: int, device: torch.device
) -> None:
    """NaN/Inf in the weight reach ``h`` (as torch's own ops do), but ``u_new`` is the previous ``u``."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    w.view(-1)[4] = bad
    k = min(shape[out_axis], w.numel() // shape[out_axis])
    u = torch.nn.functional.normalize(torch.arange(1.0, k + 1), dim=0).to(device)
    h, u1 = aon(w, u, order=order, n_power_iterations=iters, out_axis=out_axis)
    assert h.shape == w.shape
    assert not bool(torch.isfinite(h).all())
    torch.testing.assert_close(u1, u, rtol=0, atol=1e-6)  # kept (normalised again)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("order", [0, 2])
def test_non_finite_weight_stateless_returns_the_start_vector(bad: float, order: int) -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    w[1, 2] = bad
    h, u = aon(w, order=order)
    assert not bool(torch.isfinite(h).all())
    torch.testing.assert_close(u, start_vector(4, torch.float32, w.device), rtol=0, atol=1e-6)


def test_nan_step_does_not_poison_the_state() -> None:
    """A good step after a NaN step is as if the NaN step had not happened (up to rounding)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 6, generator=gen)
    u0 = aon(w, order=2)[1]
    bad = w.clone()
    bad[0, 0] = float("nan")
    _, u_after_nan = aon(bad, u0, order=2)
    torch.testing.assert_close(aon(w, u_after_nan, order=2)[0], aon(w, u0, order=2)[0])


# ----------------------------------------------------------------------------- empty


@pytest.mark.parametrize(
    ("shape", "out_axis"), [((0, 5), 0), ((5, 0), 0), ((0, 5), 1), ((2, 0, 3), 1)]
)
@pytest.mark.parametrize("order", [0, 2])
def test_empty_weight_gives_empty(shape: tuple[int, ...], out_axis: int, order: int) -> None:
    w = torch.zeros(shape)
    h, u = aon(w, order=order, out_axis=out_axis)
    assert h.shape == shape
    assert u.shape == (0,)


def test_public_constants() -> None:
    assert isinstance(aon_func.STATELESS_POWER_ITERATIONS, int)
    assert aon_func.STATELESS_POWER_ITERATIONS >= 1
    assert isinstance(aon_func.DEFAULT_ORDER, int)
    assert aon_func.DEFAULT_ORDER >= 0
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", aon_func.__version__)

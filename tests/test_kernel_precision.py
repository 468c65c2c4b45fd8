"""Low-precision products: ``matmul_dtype=torch.bfloat16``, TF32 on CUDA, and autocast.

The tolerances below are what bf16 operands (8 significant bits, float32
accumulation) cost on the properties of ``docs/algorithm.md``, with ``u`` the
exact top singular vector. Measured over the shapes below and K = 1..8 (see
docs/performance.md, "Precision"): ``|s_max(h) - 1|`` at most 4.0e-3 and the
spectrum map within 4.0e-3 of ``f_K``, against 1e-6 with float32 products.
The tests allow 1e-2 for both.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from aon_func import AON, aon, singular_value_map
from aon_func._kernel import check_matmul_dtype

F64 = torch.float64

BF16_TOP_TOL = 1e-2
"""``|s_max(h) - 1|`` with bf16 products (measured at most 4.0e-3 for K <= 8)."""
BF16_MAP_TOL = 1e-2
"""``max |svdvals(h) - f_K(s / s_max)|`` with bf16 products (measured at most 4.0e-3)."""
F32_TOL = 1e-5
"""The same two errors with float32 products (measured at most 1e-6)."""

SHAPES = [(64, 576), (256, 2304), (384, 384), (300, 40)]


def _spectrum(m: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A float64 ``m x n`` matrix with singular values 1 and ``0.8 .. 0.25`` (a gap under the top)."""
    k = min(m, n)
    s = torch.cat([torch.ones(1, dtype=F64), torch.linspace(0.8, 0.25, k - 1, dtype=F64)])
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]
    return (u * s) @ v.T, s


def _top_u(w: Tensor) -> Tensor:
    z = w if w.shape[0] <= w.shape[1] else w.T
    return torch.linalg.svd(z, full_matrices=False)[0][:, 0].contiguous()


def _errors(h: Tensor, s: Tensor, order: int) -> tuple[float, float]:
    sv = torch.linalg.svdvals(h.double().cpu())
    return abs(float(sv[0]) - 1.0), float((sv - singular_value_map(s, order)).abs().max())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("order", [1, 2, 4, 8])
def test_bf16_products_keep_the_properties_within_their_tolerance(
    shape: tuple[int, int], order: int, device: torch.device
) -> None:
    w64, s = _spectrum(*shape, seed=order)
    w, u = w64.float().to(device), _top_u(w64).float().to(device)
    h, u_new = aon(w, u, order=order, matmul_dtype=torch.bfloat16)
    assert h.dtype == torch.float32
    assert u_new.dtype == torch.float32
    top, smap = _errors(h, s, order)
    assert top <= BF16_TOP_TOL
    assert smap <= BF16_MAP_TOL
    h32, _ = aon(w, u, order=order)
    top32, map32 = _errors(h32, s, order)
    assert top32 <= F32_TOL
    assert map32 <= F32_TOL
    # bf16 changes the result (the option is not a no-op), by about its rounding.
    assert 1e-5 < float((h - h32).abs().max()) / float(h32.abs().max()) < 5e-2


def test_bf16_gradients_are_close_to_float32() -> None:
    w64, _ = _spectrum(96, 200, seed=3)
    w, u = w64.float().requires_grad_(), _top_u(w64).float()
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    grads = {}
    for md in (None, torch.bfloat16):
        (g,) = torch.autograd.grad((aon(w, u, order=2, matmul_dtype=md)[0] * c).sum(), w)
        grads[md] = g
    g32, g16 = grads[None], grads[torch.bfloat16]
    assert g16.dtype == torch.float32
    assert bool(torch.isfinite(g16).all())
    assert float((g16 - g32).norm() / g32.norm()) < 3e-2


def test_bf16_forward_mode_and_vmap_agree_with_reverse_mode() -> None:
    w64, _ = _spectrum(6, 10, seed=5)
    w, u = w64.float(), _top_u(w64).float()

    def f(w: Tensor) -> Tensor:
        return aon(w, u, order=3, matmul_dtype=torch.bfloat16)[0]

    jf, jr = torch.func.jacfwd(f)(w), torch.func.jacrev(f)(w)
    torch.testing.assert_close(jf, jr, atol=2e-2, rtol=2e-2)
    stack = torch.stack([w, 2 * w.flip(0)])
    got = torch.func.vmap(f)(stack)
    for i in range(2):
        torch.testing.assert_close(got[i], f(stack[i]), atol=1e-6, rtol=1e-5)


def test_matmul_dtype_float32_is_the_default_path() -> None:
    w64, _ = _spectrum(32, 80, seed=6)
    w = w64.float()
    h0, u0 = aon(w, order=2)
    h1, u1 = aon(w, order=2, matmul_dtype=torch.float32)
    assert torch.equal(h0, h1)
    assert torch.equal(u0, u1)


def test_transform_option_runs_the_kernel_in_bf16() -> None:
    w64, _ = _spectrum(48, 120, seed=7)
    params = {"fc.weight": w64.float()}
    state = AON(order=2).init(params)
    got, _ = AON(order=2, matmul_dtype=torch.bfloat16).apply(params, state)
    want, _ = aon(params["fc.weight"], state["fc.weight"], order=2, matmul_dtype=torch.bfloat16)
    torch.testing.assert_close(got["fc.weight"], want)
    assert AON(matmul_dtype=torch.bfloat16) != AON()  # part of the (hashable) configuration


def test_autocast_does_not_reach_the_kernel() -> None:
    """Under ``torch.autocast`` the products keep the kernel's own precision (float32 here)."""
    w64, _ = _spectrum(40, 90, seed=8)
    w, u = w64.float(), _top_u(w64).float()
    h0, u0 = aon(w, u, order=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1, u1 = aon(w, u, order=2)
    assert h1.dtype == torch.float32
    torch.testing.assert_close(h1, h0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(u1, u0, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="TF32 is a CUDA matmul mode (torch.cuda.is_available() is False)",
)
@pytest.mark.parametrize("order", [1, 2, 4])
def test_tf32_cuda_keeps_the_properties_within_the_bf16_tolerance(order: int) -> None:
    w64, s = _spectrum(256, 2304, seed=order)
    w, u = w64.float().cuda(), _top_u(w64).float().cuda()
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        h, _ = aon(w, u, order=order)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    top, smap = _errors(h, s, order)
    assert top <= BF16_TOP_TOL
    assert smap <= BF16_MAP_TOL


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, "bfloat16", 16])
def test_bad_matmul_dtype_is_refused_at_the_boundary(bad: object) -> None:
    w = torch.randn(4, 6)
    with pytest.raises(TypeError, match="matmul_dtype"):
        aon(w, order=2, matmul_dtype=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="matmul_dtype"):
        AON(matmul_dtype=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=repr(bad) if isinstance(bad, str) else str(bad)):
        check_matmul_dtype(bad)

"""The orthonormal-regularisation penalties: closed forms, state, vmap, grad, errors."""

from __future__ import annotations

import doctest

import pytest
import torch

import aon_func
from aon_func import _penalties, orthogonality_error, soft_orthogonality_penalty, srip_penalty

SHAPES = [(1, 1), (1, 7), (7, 1), (5, 9), (9, 5), (6, 3, 3), (4, 2, 3, 3)]


def _matrix(w: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    z = torch.movedim(w, out_axis, 0).reshape(w.shape[out_axis], -1)
    return z if z.shape[0] <= z.shape[1] else z.T


def test_doctests() -> None:
    assert doctest.testmod(_penalties, raise_on_error=False).failed == 0


def test_public() -> None:
    assert "soft_orthogonality_penalty" in aon_func.__all__
    assert "srip_penalty" in aon_func.__all__


@pytest.mark.parametrize("shape", SHAPES)
def test_soft_is_squared_orthogonality_error(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = soft_orthogonality_penalty(w)
    torch.testing.assert_close(p, orthogonality_error(w) ** 2)
    z = _matrix(w)
    eye = torch.eye(z.shape[0], dtype=z.dtype)
    torch.testing.assert_close(p, ((z @ z.T - eye) ** 2).sum())


def test_soft_out_axis_and_zero_on_orthonormal() -> None:
    w = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(
        soft_orthogonality_penalty(w, out_axis=1), orthogonality_error(w, out_axis=1) ** 2
    )
    q = aon_func.polar(torch.randn(4, 10, dtype=torch.float64))
    assert float(soft_orthogonality_penalty(q)) < 1e-20


@pytest.mark.parametrize("shape", SHAPES)
def test_srip_converged_is_max_eigenvalue_squared(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = torch.linalg.svdvals(_matrix(w))
    expected = ((s**2 - 1).abs().max()) ** 2
    p, u = srip_penalty(w, n_power_iterations=2000)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-9)
    assert u.shape == (min(_matrix(w).shape),)


def test_srip_state_tracks_and_is_lower_bound() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 30, generator=gen)
    s = torch.linalg.svdvals(w)
    exact = float(((s**2 - 1).abs().max()) ** 2)
    u = torch.randn(20, generator=gen)
    u = u / u.norm()
    values = []
    for _ in range(30):
        p, u = srip_penalty(w, u)
        values.append(float(p))
        assert float(p) <= exact * (1 + 1e-5)
    assert values[-1] == pytest.approx(exact, rel=1e-3)
    # n_power_iterations=0 keeps u (normalised again)
    _, u0 = srip_penalty(w, u, n_power_iterations=0)
    torch.testing.assert_close(u0, u, rtol=0, atol=1e-6)
    # a broken state is replaced by the start vector, not propagated
    p_nan, u_nan = srip_penalty(w, torch.full((20,), float("nan")))
    assert bool(torch.isfinite(p_nan))
    assert bool(torch.isfinite(u_nan).all())


def test_srip_gradcheck_with_fixed_u() -> None:
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    assert torch.autograd.gradcheck(lambda x: srip_penalty(x, u, n_power_iterations=0)[0], (w,))
    assert torch.autograd.gradcheck(lambda x: soft_orthogonality_penalty(x), (w,))


def test_vmap_and_grad() -> None:
    gen = torch.Generator().manual_seed(4)
    ws = torch.randn(5, 6, 8, generator=gen)
    us = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen), dim=1)
    soft = torch.func.vmap(soft_orthogonality_penalty)(ws)
    torch.testing.assert_close(soft, torch.stack([soft_orthogonality_penalty(w) for w in ws]))
    pen, u_new = torch.func.vmap(srip_penalty)(ws, us)
    for i in range(5):
        p, u = srip_penalty(ws[i], us[i])
        torch.testing.assert_close(pen[i], p)
        torch.testing.assert_close(u_new[i], u)
    g = torch.func.grad(lambda w: srip_penalty(w, us[0])[0] + soft_orthogonality_penalty(w))(ws[0])
    assert g.shape == ws[0].shape
    assert torch.isfinite(g).all()


def test_half_precision_and_zero() -> None:
    w = torch.randn(4, 6).to(torch.bfloat16)
    assert soft_orthogonality_penalty(w).dtype == torch.float32
    p, u = srip_penalty(w)
    assert p.dtype == torch.float32
    assert u.dtype == torch.float32
    p0, u0 = srip_penalty(torch.zeros(3, 5))
    assert float(p0) == pytest.approx(1.0)
    assert torch.isfinite(u0).all()


def test_errors() -> None:
    with pytest.raises(ValueError, match="ndim"):
        soft_orthogonality_penalty(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        srip_penalty(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_power_iterations=0"):
        srip_penalty(torch.randn(3, 4), n_power_iterations=0)
    with pytest.raises(ValueError, match="shape"):
        srip_penalty(torch.randn(3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="out_axis"):
        soft_orthogonality_penalty(torch.randn(3, 4), out_axis=2)

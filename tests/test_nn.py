"""``aon_func.nn.aon_norm``: one tensor, in the style of torch's ``spectral_norm``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import aon_func
from aon_func.nn import aon_norm


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _u(module: nn.Module, name: str = "weight") -> torch.Tensor:
    u = module.parametrizations[name][0].u  # type: ignore[index]
    assert isinstance(u, torch.Tensor)
    return u


def test_weight_is_the_kernel_of_the_raw_weight_and_u_advances_in_training_only() -> None:
    torch.manual_seed(0)
    layer = aon_norm(nn.Linear(12, 7), order=3, generator=_gen())
    raw = layer.parametrizations.weight.original
    u0 = _u(layer).clone()

    w = layer.weight  # training mode: one read, one step of u
    h, u1 = aon_func.aon(raw.detach(), u0, order=3)
    torch.testing.assert_close(w.detach(), h, rtol=0, atol=0)
    torch.testing.assert_close(_u(layer), u1, rtol=0, atol=0)
    assert float(torch.linalg.matrix_norm(w.detach(), ord=2)) == pytest.approx(1.0, abs=1e-4)

    layer.eval()
    before = _u(layer).clone()
    h_eval, _ = aon_func.aon(raw.detach(), before, order=3, training=False)
    torch.testing.assert_close(layer.weight.detach(), h_eval, rtol=0, atol=0)
    assert torch.equal(_u(layer), before)


def test_gradients_reach_the_raw_weight() -> None:
    torch.manual_seed(0)
    layer = aon_norm(nn.Linear(6, 4))
    layer(torch.randn(3, 6)).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("module", "axis"),
    [
        (nn.Conv2d(3, 8, 3), 0),
        (nn.ConvTranspose2d(8, 3, 3), 1),
        (nn.ConvTranspose1d(4, 6, 2), 1),
    ],
)
def test_dim_none_picks_torchs_output_axis(module: nn.Module, axis: int) -> None:
    raw = module.weight.detach().clone()
    aon_norm(module, order=2, generator=_gen())
    module.eval()
    u = _u(module)
    h, _ = aon_func.aon(raw, u, order=2, out_axis=axis, training=False)
    torch.testing.assert_close(module.weight.detach(), h, rtol=0, atol=0)
    assert u.shape == (min(raw.shape[axis], raw.numel() // raw.shape[axis]),)


def test_explicit_dim_and_other_tensor_names() -> None:
    mha = nn.MultiheadAttention(8, 2)
    aon_norm(mha, "in_proj_weight", dim=1, order=1)
    h, _ = aon_func.aon(
        mha.parametrizations.in_proj_weight.original.detach(),
        _u(mha, "in_proj_weight"),
        order=1,
        out_axis=1,
        training=False,
    )
    torch.testing.assert_close(mha.eval().in_proj_weight.detach(), h, rtol=0, atol=0)


def test_order_zero_is_spectral_norm() -> None:
    torch.manual_seed(0)
    layer = aon_norm(nn.Linear(10, 6), order=0)
    w = layer.parametrizations.weight.original.detach()
    expected = w / torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(layer.eval().weight.detach(), expected, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trips_into_a_fresh_module() -> None:
    torch.manual_seed(0)
    a = aon_norm(nn.Linear(9, 5), order=2)
    for _ in range(3):  # advance u away from its initial value
        a(torch.randn(2, 9))
    sd = a.state_dict()
    assert sorted(sd) == ["bias", "parametrizations.weight.0.u", "parametrizations.weight.original"]

    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    b = aon_norm(nn.Linear(9, 5), order=2)
    b.load_state_dict(sd)
    assert torch.equal(_u(b), _u(a))
    x = torch.randn(4, 9)
    torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=0, atol=0)


def test_assignment_sets_the_raw_weight() -> None:
    torch.manual_seed(0)
    layer = aon_norm(nn.Linear(8, 4), order=2)
    original = layer.parametrizations.weight.original
    new = torch.randn(4, 8)
    layer.weight = new
    assert layer.parametrizations.weight.original is original  # the same Parameter object
    assert torch.equal(original.detach(), new)
    layer.eval()
    h, _ = aon_func.aon(new, _u(layer), order=2, training=False)
    torch.testing.assert_close(layer.weight.detach(), h, rtol=0, atol=0)

    with pytest.raises(
        ValueError, match=r"assigned weight must have shape=\(4, 8\).*shape=\(8, 4\)"
    ):
        layer.weight = torch.randn(8, 4)


def test_torch_remove_parametrizations_bakes_the_normalised_weight() -> None:
    torch.manual_seed(0)
    layer = aon_norm(nn.Linear(8, 4)).eval()
    w = layer.weight.detach().clone()
    torch_parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Linear
    torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=0)


def test_aon_func_remove_parametrizations_finds_it() -> None:
    layer = aon_norm(nn.Linear(8, 4)).eval()
    w = layer.weight.detach().clone()
    aon_func.remove_parametrizations(layer)
    assert torch.equal(layer.weight.detach(), w)


def test_half_precision_keeps_u_in_float32() -> None:
    layer = aon_norm(nn.Linear(8, 4).to(torch.bfloat16))
    assert _u(layer).dtype == torch.float32
    assert layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: aon_norm(nn.Linear(4, 3), "nope"), ValueError, "Linear has no parameter.*'nope'"),
        (lambda: aon_norm(nn.Linear(4, 3), "bias"), ValueError, r"Linear.bias must have ndim >= 2"),
        (lambda: aon_norm("layer"), TypeError, "module must be an nn.Module, got str"),  # type: ignore[arg-type]
        (lambda: aon_norm(nn.Linear(4, 3), dim=2), ValueError, r"out of range for Linear.weight"),
        (lambda: aon_norm(nn.Linear(4, 3), order=-1), ValueError, "order"),
        (lambda: aon_norm(aon_norm(nn.Linear(4, 3))), ValueError, "already normalised"),
    ],
)
def test_errors_name_the_argument(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_integer_weight_is_refused() -> None:
    layer = nn.Module()
    layer.register_buffer("weight", torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"floating dtype.*dtype=torch.int64"):
        aon_norm(layer)

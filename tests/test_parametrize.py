"""The module adapter: ``aon_func.parametrize`` and ``aon_func.remove_parametrizations``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

import aon_func
from aon_func import AON, ONI, gain_key
from aon_func._parametrize import WeightParametrization


class _Net(nn.Module):
    """A ConvTranspose (output axis 1), an attention block and a Linear, plus a norm and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 6)
        self.up = nn.ConvTranspose1d(6, 4, 3)
        self.attn = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.up(self.emb(idx).mT).mT  # (B, L + 2, 4)
        return self.head(self.norm(self.attn(h)).mean(dim=1))


def _setup(device: torch.device) -> tuple[_Net, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 5, (3, 4), generator=g).to(device)
    y = torch.randint(0, 3, (3,), generator=g).to(device)
    return _Net().to(device), idx, y


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _get(module: nn.Module, name: str) -> Tensor:
    owner, _, tensor = name.rpartition(".")
    return getattr(module.get_submodule(owner), tensor)


def _parametrizations(net: nn.Module) -> dict[str, WeightParametrization]:
    """Ours, by the name of the tensor they parametrize."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, WeightParametrization):
            owner, tensor = name.removesuffix(".0").rsplit(".parametrizations.", 1)
            out[f"{owner}.{tensor}"] = m
    return out


def _raw(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def test_same_weights_and_state_as_apply(device: torch.device) -> None:
    net, idx, _ = _setup(device)
    reference = copy.deepcopy(net)
    aon = AON.for_module(net, order=2)
    params = _raw(net)
    state = aon.init(params, generator=_gen())

    assert aon_func.parametrize(net, order=2, state=state) is net
    plist = _parametrizations(net)
    assert sorted(plist) == sorted(aon.include)
    assert plist["up.weight"].transform.out_axes["weight"] == 1
    assert not torch_parametrize.is_parametrized(net.emb)
    assert not torch_parametrize.is_parametrized(net.norm)
    us = {n: p.u for n, p in plist.items()}
    _assert_close(us, state, rtol=0, atol=0)  # registration did not advance u

    s = state
    for _ in range(3):  # training mode: u advances as apply's state does
        with torch_parametrize.cached():  # attention reads in_proj_weight 3 times
            out = net(idx)
        expected, s = aon.functional_call(reference, params, s, idx)
        torch.testing.assert_close(out, expected)
        # The adapter runs one matrix per call and apply batches them: equal up to rounding.
        _assert_close({n: p.u for n, p in plist.items()}, s)
    # eval mode: the weights of apply(training=False); u stays
    weights, _ = aon.apply(params, s, training=False)
    before = {n: p.u.clone() for n, p in plist.items()}
    net.eval()
    with torch.no_grad():
        _assert_close({n: _get(net, n) for n in plist}, {n: weights[n] for n in plist})
        net(idx)
    _assert_close({n: p.u for n, p in plist.items()}, before, rtol=0, atol=0)


def test_default_state_is_init_with_the_generator() -> None:
    net, _, _ = _setup(torch.device("cpu"))
    state = AON.for_module(net).init(_raw(net), generator=_gen())
    aon_func.parametrize(net, generator=_gen())
    _assert_close({n: p.u for n, p in _parametrizations(net).items()}, state, rtol=0, atol=0)


@pytest.mark.parametrize("n_power_iterations", [0, 1])
def test_torch_optim_with_learnable_gains_equals_functional_training(
    device: torch.device, n_power_iterations: int
) -> None:
    net, idx, y = _setup(device)
    reference = copy.deepcopy(net)
    aon = AON.for_module(net, order=1, n_power_iterations=n_power_iterations)
    params = aon.add_gains(_raw(net), init=1.5)
    state = aon.init(params, generator=_gen())

    aon_func.parametrize(net, transform=aon, state=state, learnable_gain=1.5)
    plist = _parametrizations(net)
    for p in plist.values():
        assert isinstance(p.gain, nn.Parameter)
        assert p.gain.shape == ()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        # cached(): MultiheadAttention reads in_proj_weight three times per
        # forward, which would otherwise advance its u three times
        with torch_parametrize.cached():
            loss = F.cross_entropy(net(idx), y)
        loss.backward()  # the in-place update of u did not break the graph
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    def loss_fn(p: dict, s: dict) -> tuple[Tensor, dict]:
        out, s = aon.functional_call(reference, p, s, idx)
        return F.cross_entropy(out, y), s

    p, s = params, state
    for _ in range(4):
        grads, s = torch.func.grad(loss_fn, has_aux=True)(p, s)
        p = {k: p[k] - 0.1 * grads[k] for k in p}
    for name, module in plist.items():
        assert module.gain is not None
        torch.testing.assert_close(module.gain.detach(), p[gain_key(name)])
    raw = {
        k.replace(".parametrizations.", ".").removesuffix(".original"): v.detach()
        for k, v in net.named_parameters()
        if not k.endswith(".gain")
    }
    # float32 round-off of two different graphs, over four steps
    _assert_close(
        raw, {k: v for k, v in p.items() if not k.endswith(":gain")}, rtol=1e-4, atol=1e-4
    )
    _assert_close({n: m.u for n, m in plist.items()}, s, rtol=1e-4, atol=1e-4)


def test_remove_parametrizations_bakes_the_eval_weights(device: torch.device) -> None:
    net, idx, _ = _setup(device)
    aon_func.parametrize(net, order=2, generator=_gen(), learnable_gain=2.0)
    net(idx)  # one training step of u
    names = sorted(_parametrizations(net))
    originals = {n: _original(net, n) for n in names}
    net.eval()
    with torch.no_grad():
        weights = {n: _get(net, n).clone() for n in names}
        out = net(idx)
    aon_func.remove_parametrizations(net)
    assert not any(torch_parametrize.is_parametrized(m) for m in net.modules())
    assert type(net.head) is nn.Linear
    for n in names:
        w = _get(net, n)
        assert isinstance(w, nn.Parameter)
        assert torch.equal(w, weights[n])
    for n, original in originals.items():
        assert _get(net, n) is original  # the same parameter object, now holding g * h(W)
    with torch.no_grad():
        torch.testing.assert_close(net(idx), out)
    with pytest.raises(ValueError, match=r"no parametrization made by aon_func\.parametrize"):
        aon_func.remove_parametrizations(net)


def _linear(*, cached_reads: int, plain_reads: int) -> WeightParametrization:
    torch.manual_seed(0)
    net = nn.Linear(4, 6)
    # init_iterations=0: u far from converged, so that every step changes it
    aon_func.parametrize(net, transform=AON.for_module(net, init_iterations=0), generator=_gen())
    with torch_parametrize.cached():
        reads = [net.weight for _ in range(cached_reads)]
    assert all(w is reads[0] for w in reads)
    for _ in range(plain_reads):
        _ = net.weight
    (p,) = _parametrizations_of_linear(net)
    return p


def test_cached_computes_the_weights_and_advances_u_once() -> None:
    once = _linear(cached_reads=0, plain_reads=1).u
    assert once is not None
    assert torch.equal(_linear(cached_reads=3, plain_reads=0).u, once)
    assert not torch.equal(_linear(cached_reads=0, plain_reads=2).u, once)


def _parametrizations_of_linear(net: nn.Module) -> list[WeightParametrization]:
    return [m for m in net.modules() if isinstance(m, WeightParametrization)]


def test_state_dict_save_load_and_deepcopy() -> None:
    net, idx, _ = _setup(torch.device("cpu"))
    aon_func.parametrize(net, order=2, generator=_gen(), learnable_gain=1.0)
    net(idx)
    sd = net.state_dict()
    assert "head.parametrizations.weight.0.u" in sd
    assert "head.parametrizations.weight.0.gain" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other, _, _ = _setup(torch.device("cpu"))
    torch.manual_seed(5)
    aon_func.parametrize(
        other, order=2, generator=torch.Generator().manual_seed(9), learnable_gain=1.0
    )
    other.load_state_dict(torch.load(buf))
    twin = copy.deepcopy(net)
    net.eval(), other.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(idx), net(idx))
        torch.testing.assert_close(twin(idx), net(idx))


def test_stateless_neighbour_and_half_precision() -> None:
    net = nn.Linear(6, 4).to(torch.bfloat16)
    params = _raw(net)
    aon_func.parametrize(net, transform=ONI.for_module(net, iterations=3))
    (p,) = _parametrizations_of_linear(net)
    assert p.u is None
    assert "parametrizations.weight.0.u" not in net.state_dict()
    expected, _ = ONI(iterations=3).apply(params)
    assert net.weight.dtype == torch.bfloat16
    torch.testing.assert_close(net.weight, expected["weight"])

    half = nn.Linear(6, 4).to(torch.bfloat16)
    aon_func.parametrize(half, order=2, generator=_gen())
    (p,) = _parametrizations_of_linear(half)
    assert p.u is not None
    assert p.u.dtype == torch.float32
    assert half.weight.dtype == torch.bfloat16
    s = torch.linalg.matrix_norm(half.weight.detach().float(), ord=2)
    assert s.item() == pytest.approx(1.0, abs=2e-2)


def test_errors() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(TypeError, match="both transform and options"):
        aon_func.parametrize(net, transform=AON(), order=2)
    with pytest.raises(TypeError, match="learnable_gain must be a positive float or None"):
        aon_func.parametrize(net, learnable_gain=True)
    with pytest.raises(TypeError, match="transform must be a WeightTransform"):
        aon_func.parametrize(net, transform="aon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing keys \['2.weight'\]"):
        aon_func.parametrize(net, state={"0.weight": torch.ones(3) / 3**0.5})
    assert not torch_parametrize.is_parametrized(net[0])  # nothing registered on error
    aon_func.parametrize(net)
    with pytest.raises(ValueError, match=r"already parametrized by aon_func\.parametrize"):
        aon_func.parametrize(net)


def _original(net: nn.Module, name: str) -> Tensor:
    owner, _, tensor = name.rpartition(".")
    return net.get_submodule(owner).parametrizations[tensor].original


def _assert_close(a: dict, b: dict, **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)

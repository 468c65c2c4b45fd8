"""The whole-model transform: selection, init, apply, gains, for_module, neighbours."""

from __future__ import annotations

import copy
import pickle
import re
from unittest.mock import patch

import pytest
import torch
from torch import nn

import aon_func
from aon_func import AON, ONI, NewtonSchulz, Polar, gain_key
from aon_func._layout import layout_of, to_matrix
from aon_func._neighbours import newton_schulz_matrix, oni_matrix


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Tensors of several kinds: two same-shaped groups, a tall one, a conv, a bias, a norm."""
    g = _gen(1)
    shapes = {
        "a.weight": (5, 7),
        "b.weight": (5, 7),
        "c.weight": (7, 5),  # tall: its transpose has the oriented shape of a and b
        "d.weight": (4, 3, 2, 2),
        "e.weight": (6, 6),
        "e.bias": (6,),
        "norm.weight": (6,),
    }
    return {
        k: torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for k, s in shapes.items()
    }


def _clone(d: dict) -> dict:
    return {k: v.clone() for k, v in d.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


NORMALISED = ["a.weight", "b.weight", "c.weight", "d.weight", "e.weight"]


# ---------------------------------------------------------------- selection and init


def test_default_selection_is_floating_matrices_named_weight() -> None:
    params = _params()
    params["idx.weight"] = torch.zeros(3, 3, dtype=torch.long)
    params["proj"] = torch.randn(3, 3)
    assert sorted(AON().select(params)) == NORMALISED


@pytest.mark.parametrize(
    "include",
    [
        r"^[ab]\.",
        re.compile(r"^[ab]\."),
        lambda name, t: name in ("a.weight", "b.weight"),
        ["a.weight", "b.weight"],
    ],
    ids=["regex", "compiled", "callable", "names"],
)
def test_include_forms(include: object) -> None:
    assert sorted(AON(include=include).select(_params())) == ["a.weight", "b.weight"]


def test_init_is_deterministic_unit_and_warm(device: torch.device) -> None:
    params = _params(device)
    aon = AON(order=1)
    s1, s2 = aon.init(params, generator=_gen(3)), aon.init(params, generator=_gen(3))
    s3 = aon.init(params, generator=_gen(4))
    assert sorted(s1) == NORMALISED
    for name, u in s1.items():
        k = min(params[name].shape[0], params[name][0].numel())
        assert u.shape == (k,)
        assert u.dtype == torch.float32
        assert u.device.type == device.type
        assert torch.equal(u, s2[name])
        assert torch.linalg.vector_norm(u).item() == pytest.approx(1.0, abs=1e-5)
        # warmed up: u^T Z Z^T u is close to s_max^2
        z = to_matrix(params[name], layout_of(params[name].shape, 0))
        if z.shape[0] > z.shape[1]:
            z = z.mT
        s_max = torch.linalg.matrix_norm(z, ord=2)
        assert float(torch.linalg.vector_norm(z.mT @ u)) == pytest.approx(s_max.item(), rel=1e-3)
    assert any(not torch.equal(s1[n], s3[n]) for n in s1)
    assert AON().init(params).keys() == s1.keys()  # no generator: torch's default one


def test_state_round_trips_torch_save(tmp_path) -> None:
    params = _params()
    aon = AON(order=2)
    state = aon.init(params, generator=_gen())
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    _assert_same(loaded, state)
    w1, n1 = aon.apply(params, state)
    w2, n2 = aon.apply(params, loaded)
    _assert_same(w1, w2)
    _assert_same(n1, n2)


def test_transforms_pickle_and_deep_copy() -> None:
    for t in (AON(order=2, out_axes={"w": 1}, include=["w"]), Polar(), ONI(iterations=3)):
        assert pickle.loads(pickle.dumps(t)) == t
        assert copy.deepcopy(t) == t
    with pytest.raises(TypeError):
        AON().out_axes["x"] = 1  # type: ignore[index]


# ---------------------------------------------------------------- apply == the kernel


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_apply_equals_the_kernel_tensor_by_tensor(
    device: torch.device, order: int, batching: str
) -> None:
    params = _params(device)
    aon = AON(order=order, n_power_iterations=2, batching=batching, out_axes={"d.weight": 1})
    state = aon.init(params, generator=_gen())
    weights, new_state = aon.apply(params, state)
    assert weights.keys() == params.keys()
    assert new_state.keys() == state.keys()
    for name in NORMALISED:
        out_axis = 1 if name == "d.weight" else 0
        h, u = aon_func.aon(
            params[name], state[name], order=order, n_power_iterations=2, out_axis=out_axis
        )
        torch.testing.assert_close(weights[name], h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_state[name], u, rtol=1e-5, atol=1e-6)
        assert weights[name].shape == params[name].shape
    # the stateless mode is the kernel's stateless mode
    weights0, state0 = aon.apply(params, None)
    for name in NORMALISED:
        out_axis = 1 if name == "d.weight" else 0
        h, u = aon_func.aon(params[name], order=order, n_power_iterations=2, out_axis=out_axis)
        torch.testing.assert_close(weights0[name], h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state0[name], u, rtol=1e-5, atol=1e-6)


def test_unselected_pass_through_and_nothing_in_place() -> None:
    params = _params()
    aon = AON()
    state = aon.init(params, generator=_gen())
    before_p, before_s = _clone(params), _clone(state)
    weights, new_state = aon.apply(params, state)
    assert weights["e.bias"] is params["e.bias"]
    assert weights["norm.weight"] is params["norm.weight"]
    assert all(weights[n] is not params[n] for n in NORMALISED)
    assert new_state is not state
    assert all(new_state[n] is not state[n] for n in NORMALISED)
    _assert_same(params, before_p)
    _assert_same(state, before_s)


def test_eval_returns_the_state_unchanged() -> None:
    params = _params()
    aon = AON(order=2)
    state = aon.init(params, generator=_gen())
    w_eval, s_eval = aon.apply(params, state, training=False)
    w_train, _ = aon.apply(params, state, training=True)
    assert s_eval.keys() == state.keys()
    assert all(s_eval[n] is state[n] for n in state)
    # eval runs the same number of iterations; only the returned state differs
    for n in NORMALISED:
        torch.testing.assert_close(w_eval[n], w_train[n])


def test_state_none_gives_unit_spectral_norm() -> None:
    params = _params(dtype=torch.float64)
    weights, state = AON(order=0).apply(params, None)
    assert sorted(state) == NORMALISED
    for n in NORMALISED:
        w = weights[n].reshape(weights[n].shape[0], -1)
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_compute_in_float32(device: torch.device, dtype: torch.dtype) -> None:
    params = _params(device, dtype)
    aon = AON(order=2)
    state = aon.init(params, generator=_gen())
    assert all(u.dtype == torch.float32 for u in state.values())
    gains = aon.add_gains(params, init=1.5)
    assert all(gains[gain_key(n)].dtype == dtype for n in NORMALISED)
    weights, new_state = aon.apply(gains, state)
    assert all(u.dtype == torch.float32 for u in new_state.values())
    for n in NORMALISED:
        assert weights[n].dtype == dtype
        h, _ = aon_func.aon(params[n].float(), state[n], order=2)
        torch.testing.assert_close(weights[n].float(), 1.5 * h, rtol=1e-2, atol=1e-2)


def test_compute_dtype_override() -> None:
    params = _params()
    aon = AON(order=2, compute_dtype=torch.float64)
    state = aon.init(params, generator=_gen())
    assert all(u.dtype == torch.float64 for u in state.values())
    weights, _ = aon.apply(params, state)
    assert all(weights[n].dtype == torch.float32 for n in NORMALISED)


# ---------------------------------------------------------------- gains


def test_fixed_and_learnable_gains() -> None:
    params = _params(dtype=torch.float64)
    aon = AON(order=1)
    state = aon.init(params, generator=_gen())
    plain, _ = aon.apply(params, state)
    fixed, _ = AON(order=1, gain=2.0).apply(params, state)
    with_gains = aon.add_gains(params, init=3.0)
    assert sorted(set(with_gains) - set(params)) == sorted(gain_key(n) for n in NORMALISED)
    learnable, _ = aon.apply(with_gains, state)
    assert learnable.keys() == params.keys()  # the gains are consumed
    both, _ = AON(order=1, gain=2.0).apply(with_gains, state)
    for n in NORMALISED:
        torch.testing.assert_close(fixed[n], 2.0 * plain[n])
        torch.testing.assert_close(learnable[n], 3.0 * plain[n])
        torch.testing.assert_close(both[n], 6.0 * plain[n])


def test_gain_gradient() -> None:
    params = AON().add_gains(_params(dtype=torch.float64), init=0.5)
    aon = AON()
    state = aon.init(params, generator=_gen())
    target = {n: torch.randn_like(params[n]) for n in NORMALISED}

    def loss(p: dict) -> torch.Tensor:
        w, _ = aon.apply(p, state, training=False)
        return sum((w[n] * target[n]).sum() for n in NORMALISED)  # type: ignore[return-value]

    grads = torch.func.grad(loss)(params)
    plain, _ = aon.apply(_params(dtype=torch.float64), state, training=False)
    for n in NORMALISED:
        torch.testing.assert_close(grads[gain_key(n)], (plain[n] * target[n]).sum())


def test_add_gains_follows_requires_grad_and_does_not_modify() -> None:
    net = nn.Linear(4, 3)
    params = dict(net.named_parameters())
    out = AON().add_gains(params)
    assert sorted(params) == ["bias", "weight"]
    g = out[gain_key("weight")]
    assert g.shape == ()
    assert g.is_leaf
    assert g.requires_grad
    g2 = AON().add_gains({k: v.detach() for k, v in params.items()})[gain_key("weight")]
    assert not g2.requires_grad


# ---------------------------------------------------------------- for_module


class _Models(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.c1, self.c2, self.c3 = nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3), nn.Conv3d(2, 3, 1)
        self.t1 = nn.ConvTranspose1d(2, 3, 3)
        self.t2 = nn.ConvTranspose2d(2, 3, 3)
        self.t3 = nn.ConvTranspose3d(2, 3, 1)
        self.att = nn.MultiheadAttention(4, 2)
        self.att_kv = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)
        self.emb = nn.Embedding(10, 4)
        self.ln, self.bn = nn.LayerNorm(4), nn.BatchNorm2d(3)


def test_for_module_selects_linear_maps_with_their_output_axes() -> None:
    net = _Models()
    aon = AON.for_module(net, order=2)
    assert aon.order == 2
    assert aon.include == {
        "lin.weight",
        "c1.weight",
        "c2.weight",
        "c3.weight",
        "t1.weight",
        "t2.weight",
        "t3.weight",
        "att.in_proj_weight",
        "att.out_proj.weight",
        "att_kv.q_proj_weight",
        "att_kv.k_proj_weight",
        "att_kv.v_proj_weight",
        "att_kv.out_proj.weight",
    }
    assert dict(aon.out_axes) == {"t1.weight": 1, "t2.weight": 1, "t3.weight": 1}
    params = {k: v.detach() for k, v in net.named_parameters()}
    state = aon.init(params, generator=_gen())
    weights, _ = aon.apply(params, state)
    # ConvTranspose: output axis 1, so the columns of the (3, 2*3*3) view have unit norm at most
    h, _ = aon_func.aon(params["t2.weight"], state["t2.weight"], order=2, out_axis=1)
    torch.testing.assert_close(weights["t2.weight"], h)
    assert weights["emb.weight"] is params["emb.weight"]


def test_for_module_exclude_and_errors() -> None:
    net = _Models()
    aon = AON.for_module(net, exclude=["lin.weight", "t1.weight"])
    assert "lin.weight" not in aon.include
    assert "t1.weight" not in aon.out_axes
    with pytest.raises(ValueError, match=r"exclude names \['emb.weight'\]"):
        AON.for_module(net, exclude=["emb.weight"])
    with pytest.raises(TypeError, match="for_module chooses include"):
        AON.for_module(net, include="weight")
    assert isinstance(Polar.for_module(net), Polar)


# ---------------------------------------------------------------- neighbours on the engine


def test_neighbours_run_on_the_engine() -> None:
    params = _params(dtype=torch.float64)
    for t, fn in (
        (ONI(iterations=4), lambda z: oni_matrix(z, 4)),
        (NewtonSchulz(steps=3), lambda z: newton_schulz_matrix(z, 3)),
        (Polar(), None),
    ):
        assert t.init(params) == {}
        weights, state = t.apply(params, {})
        weights0, state0 = t.apply(params, None)
        assert state == {}
        assert state0 == {}
        for n in NORMALISED:
            torch.testing.assert_close(weights[n], weights0[n])
            if fn is None:
                expected = aon_func.polar(params[n])
            else:
                layout = layout_of(params[n].shape, 0)
                z = to_matrix(params[n], layout)
                from aon_func._layout import from_matrix

                expected = from_matrix(fn(z), layout)
            torch.testing.assert_close(weights[n], expected)
    with pytest.raises(ValueError, match="unexpected keys"):
        Polar().apply(params, AON().init(params))


# ---------------------------------------------------------------- under vmap and compile


def test_apply_under_vmap_with_state_none_and_gains() -> None:
    params = AON().add_gains(_params(), init=2.0)
    stacked = {k: torch.stack([v, 0.5 * v, v.flip(0)]) for k, v in params.items()}
    aon = AON(order=2)
    weights, state = torch.func.vmap(lambda p: aon.apply(p, None))(stacked)
    for i in range(3):
        w_i, s_i = aon.apply({k: v[i] for k, v in stacked.items()}, None)
        for n in NORMALISED:
            torch.testing.assert_close(weights[n][i], w_i[n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state[n][i], s_i[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("include", [r"^[a-e]\.weight$", re.compile(r"^[a-e]\.weight$")])
def test_apply_state_none_and_gains_compile_without_graph_breaks(include: object) -> None:
    # Dynamo only (backend="eager"): the stateless mode unrolls its 64 power
    # iterations, which Inductor takes minutes to compile on a small CPU; the
    # full compile of a training step (with a state) is in test_transform_usecases.py.
    params = AON().add_gains(_params(), init=2.0)
    aon = AON(order=2, include=include)

    def f(p: dict) -> tuple[dict, dict]:
        return aon.apply(p, None)

    torch._dynamo.reset()  # this code object was compiled by the other parametrisation
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with patch.object(torch._dynamo.config, "error_on_recompile", True):
        for scale in (1.0, 2.0, 3.0):
            p = {k: scale * v for k, v in params.items()}
            w_c, s_c = compiled(p)
            w_e, s_e = f(p)
            for n in NORMALISED:
                torch.testing.assert_close(w_c[n], w_e[n])
                torch.testing.assert_close(s_c[n], s_e[n])


@pytest.mark.parametrize("tr", [AON(order=2), AON(order=0), ONI(), Polar()], ids=repr)
def test_a_layer_with_no_outputs_or_no_inputs(tr: aon_func.WeightTransform) -> None:
    """Zero-size matrices: ``init``, ``apply`` and the adapter give empty states and weights."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0), nn.Linear(0, 3))
    params = {k: v.detach() for k, v in net.named_parameters()}
    state = tr.init(params)
    weights, new = tr.apply(params, state)
    for name in ("1.weight", "2.weight"):
        assert weights[name].shape == params[name].shape
        if isinstance(tr, AON):
            assert state[name].shape == new[name].shape == (0,)
    aon_func.parametrize(net, transform=tr)
    assert net(torch.randn(2, 4)).shape == (2, 3)


def test_new_state_keeps_the_order_of_the_given_state() -> None:
    """The plan runs 8x8 before 3x8 here; the state comes back in init's order all the same
    (``torch.compile`` guards on a dict's key order: another order would recompile)."""
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    params = {k: v.detach() for k, v in net.named_parameters()}
    tr = AON.for_module(net, order=2)
    state = tr.init(params)
    _, new = tr.apply(params, state)
    assert list(new) == list(state)
    reordered = dict(reversed(list(state.items())))
    assert list(tr.apply(params, reordered)[1]) == list(reordered)
    assert list(tr.apply(params, None)[1]) == list(state)

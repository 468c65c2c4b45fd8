"""Failure modes: stale and broken state, zero and extreme weights, neighbours, value checks.

Each test here failed on v0.1 (see docs/failure-modes.md for what each transform
does with stale state, zero, NaN, tiny and huge weights and float16).
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import aon_func
from aon_func import AON, ONI, NewtonSchulz, Polar, aon
from aon_func._kernel import start_vector
from aon_func._parametrize import WeightParametrization

F64 = torch.float64
ORDERS = st.integers(1, 8)


def spectral_norm(h: Tensor) -> float:
    return float(torch.linalg.matrix_norm(h.double(), ord=2))


# ----------------------------------------------------------------------------- 1. stale u


def test_reproducer_of_the_stale_state_blow_up() -> None:
    w = torch.diag(torch.tensor([10.0, 1.0, 1.0]))
    u = F.normalize(torch.tensor([1e-3, 1.0, 1.0]), dim=0)
    for order in range(1, 9):
        h, _ = aon(w, u, order=order)
        assert bool(torch.isfinite(h).all())
        assert spectral_norm(h) <= 1.05, order
        assert float(h[0, 0]) > 0  # the top direction keeps its sign
    # K = 0 is plain spectral normalisation, exempt: one Miyato step, as torch's.
    h0, _ = aon(w, u, order=0)
    assert 9.0 < spectral_norm(h0) < 10.0


@st.composite
def stale_cases(draw: st.DrawFn) -> tuple[Tensor, Tensor, int]:
    """``(Z, u, K)``: ``u`` has overlap exactly 1e-3 with the top singular subspace.

    The top subspace (singular values >= 0.99 s_max) has dimension 1 or 2;
    the next singular value is ``gap * s_max`` with ``gap`` in [0.3, 0.95],
    the others spread below it (or all equal to it: the hardest case).
    """
    k = draw(st.integers(2, 24))
    n = k + draw(st.integers(0, 24))
    gap = draw(st.floats(0.3, 0.95))
    top = draw(st.integers(1, min(2, k - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    flat = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    rest = torch.full((k - top,), gap, dtype=F64)
    if not flat:
        rest[1:] = gap * torch.rand(k - top - 1, generator=gen, dtype=F64)
    s = torch.cat([1.0 - 0.01 * torch.rand(top, generator=gen, dtype=F64), rest])
    s = s.sort(descending=True).values * draw(st.sampled_from([1e-20, 1.0, 1e20]))
    uu = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))[0]
    vv = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]
    z = (uu * s) @ vv.T
    t = uu[:, :top]
    a = F.normalize(torch.randn(top, generator=gen, dtype=F64), dim=0)
    b = torch.randn(k, generator=gen, dtype=F64)
    b = F.normalize(b - t @ (t.T @ b), dim=0)
    u = 1e-3 * (t @ a) + math.sqrt(1 - 1e-6) * b
    dtype = draw(st.sampled_from([torch.float32, F64]))
    return z.to(dtype), u.to(dtype), draw(ORDERS)


@given(case=stale_cases())
def test_stale_state_is_bounded(case: tuple[Tensor, Tensor, int]) -> None:
    """Overlap 1e-3 with the top subspace: ``h`` finite and ``||h||_2 <= 1.05`` (K = 1..8)."""
    z, u, order = case
    h, u_new = aon(z, u, order=order)
    assert bool(torch.isfinite(h).all())
    assert spectral_norm(h) <= 1.05
    assert bool(torch.isfinite(u_new).all())


@st.composite
def any_states(draw: st.DrawFn) -> tuple[Tensor, Tensor, int, int]:
    """A weight and any ``u`` at all: zero, NaN, Inf, huge, tiny, orthogonal to the top."""
    k = draw(st.integers(1, 12))
    n = k + draw(st.integers(0, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["zero", "nan", "inf", "huge", "tiny", "orthogonal", "random"]))
    diag = draw(st.booleans())
    if diag:  # exact zeros stay exactly zero in the iteration: no rounding rescues u
        w = torch.zeros(k, n)
        w[range(k), range(k)] = torch.logspace(2, -2, k)
    else:
        w = torch.randn(k, n, generator=gen)
    u = torch.randn(k, generator=gen)
    if kind == "zero":
        u = torch.zeros(k)
    elif kind == "nan":
        u[draw(st.integers(0, k - 1))] = float("nan")
    elif kind == "inf":
        u[draw(st.integers(0, k - 1))] = float("inf")
    elif kind == "huge":
        u = u * 1e30
    elif kind == "tiny":
        u = u * 1e-30
    elif kind == "orthogonal" and diag and k > 1:
        u[0] = 0.0  # no component on the top singular vector e_1
    return w, u, draw(st.integers(0, 8)), draw(st.integers(0, 3))


@given(case=any_states())
def test_any_state_gives_finite_weights(case: tuple[Tensor, Tensor, int, int]) -> None:
    w, u, order, iters = case
    h, u_new = aon(w, u, order=order, n_power_iterations=iters)
    assert bool(torch.isfinite(h).all())
    assert bool(torch.isfinite(u_new).all())
    assert float(u_new.norm()) == pytest.approx(1.0, abs=1e-5)


def _soak(order: int, steps: int) -> tuple[float, float]:
    """MLP 32-64-64-10 on random data, SGD lr 1.0, gain 2: (max ||h||_2 / gain, last loss)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    tr = AON.for_module(net, order=order, gain=2.0)
    params = {k: v.detach() for k, v in net.named_parameters()}
    state = tr.init(params, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g)

    def loss_fn(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out, s = tr.functional_call(net, p, s, x)
        return F.cross_entropy(out, y), s

    worst, loss = 0.0, float("nan")
    for _ in range(steps):
        grads, (value, state) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, state)
        params = {k: v - 1.0 * grads[k] for k, v in params.items()}
        weights, _ = tr.apply(params, state, training=False)
        worst = max(worst, *(spectral_norm(weights[n]) / 2.0 for n in tr.select(params)))
        loss = float(value)
    return worst, loss


@pytest.mark.slow
@pytest.mark.parametrize("order", [1, 3, 5])
def test_soak_training_with_large_steps_stays_bounded(order: int) -> None:
    worst, loss = _soak(order, steps=300)
    assert worst <= 1.05
    assert math.isfinite(loss)


# ----------------------------------------------------------------------------- 2. zero weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("order", range(9))
def test_zero_weight_has_zero_output_and_zero_gradient(dtype: torch.dtype, order: int) -> None:
    for shape in [(4, 6), (6, 4), (3, 2, 2, 2)]:
        w = torch.zeros(shape, dtype=dtype, requires_grad=True)
        k = min(shape[0], math.prod(shape[1:]))
        for u in (None, torch.randn(k, dtype=torch.float32 if dtype != F64 else F64)):
            h, _ = aon(w, u, order=order)
            (g,) = torch.autograd.grad((h * torch.randn(shape).to(dtype)).sum(), w)
            assert torch.equal(h, torch.zeros_like(h))
            assert torch.equal(g, torch.zeros_like(g))


def test_zero_weight_through_the_transform_with_gains() -> None:
    params = {"fc.weight": torch.zeros(5, 7, requires_grad=True), "fc.bias": torch.zeros(5)}
    tr = AON(order=2)
    params = tr.add_gains(params, init=1.5)
    state = tr.init(params)
    weights, _ = tr.apply(params, state)
    g = torch.autograd.grad(
        weights["fc.weight"].sum(), [params["fc.weight"], params["fc.weight:gain"]]
    )
    assert torch.equal(weights["fc.weight"], torch.zeros(5, 7))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g)


# ----------------------------------------------------------------------------- 3. init at any scale


@pytest.mark.parametrize("order", [0, 1, 2, 4])
def test_init_warms_up_at_any_scale(order: int) -> None:
    torch.manual_seed(0)
    params = {"a.weight": torch.randn(48, 96), "b.weight": torch.randn(80, 40)}
    tr = AON(order=order)
    ref = tr.init(params, generator=torch.Generator().manual_seed(3))
    for c in [1e-30, 1e-20, 1e-6, 1.0, 1e6, 1e20, 1e30]:
        scaled = {k: v * c for k, v in params.items()}
        state = tr.init(scaled, generator=torch.Generator().manual_seed(3))
        for n in params:
            torch.testing.assert_close(state[n], ref[n], atol=1e-6, rtol=0)
        if order >= 1:
            weights, _ = tr.apply(scaled, state)
            for n in params:
                assert spectral_norm(weights[n]) == pytest.approx(1.0, abs=1e-3), (c, n)


# ----------------------------------------------------------------------------- 4. self-healing state


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "huge"])
def test_broken_state_is_replaced_by_the_start_vector(order: int, bad: str) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 9, generator=gen)
    u = {
        "zero": torch.zeros(6),
        "nan": torch.full((6,), float("nan")),
        "inf": torch.tensor([float("inf")] + [1.0] * 5),
        "huge": torch.full((6,), 1e30),
    }[bad]
    h, u_new = aon(w, u, order=order, n_power_iterations=2)
    assert bool(torch.isfinite(h).all())
    assert bool(torch.isfinite(u_new).all())
    if bad == "huge":  # a finite vector keeps its direction, whatever its size
        expected = aon(w, torch.full((6,), 1.0), order=order, n_power_iterations=2)
    else:
        expected = aon(w, start_vector(6, torch.float32, "cpu"), order=order, n_power_iterations=2)
    torch.testing.assert_close(h, expected[0])
    torch.testing.assert_close(u_new, expected[1])


def test_a_nan_state_loaded_from_a_checkpoint_heals_in_the_transform() -> None:
    params = {"a.weight": torch.randn(8, 12), "b.weight": torch.randn(8, 12)}
    tr = AON(order=2)
    state = tr.init(params)
    state["a.weight"] = torch.full((8,), float("nan"))
    weights, new = tr.apply(params, state)
    assert all(bool(torch.isfinite(t).all()) for t in [*weights.values(), *new.values()])
    assert spectral_norm(weights["a.weight"]) == pytest.approx(1.0, abs=1e-3)


def test_zero_padding_is_exact_and_a_repaired_state_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Force one bucket for matrices of different shapes (as on a GPU): the same as one by one."""
    from aon_func import _plan

    monkeypatch.setitem(
        _plan.COSTS, "cpu", _plan.CostModel(per_call=1.0, per_flop=0.0, per_byte=0.0)
    )
    gen = torch.Generator().manual_seed(6)
    params = {
        "a.weight": torch.randn(8, 20, generator=gen, dtype=F64),
        "b.weight": torch.randn(5, 12, generator=gen, dtype=F64),
        "c.weight": torch.randn(30, 6, generator=gen, dtype=F64),  # tall: k = 6
        "d.weight": torch.zeros(3, 4, dtype=F64),
    }
    for order in (1, 2, 5):
        merged, single = AON(order=order), AON(order=order, batching="loop")
        plan = merged._plan(params, None)
        assert len(plan.buckets) == 1
        assert plan.buckets[0].k == 8
        state = merged.init(params, generator=torch.Generator().manual_seed(0))
        state["b.weight"] = torch.zeros(5, dtype=F64)  # repaired inside the padded bucket
        w1, s1 = merged.apply(params, state)
        w2, s2 = single.apply(params, state)
        for n in params:
            torch.testing.assert_close(w1[n], w2[n], atol=1e-12, rtol=0)
            torch.testing.assert_close(s1[n], s2[n], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- 5. neighbours


NEIGHBOURS = [Polar(), ONI(iterations=5), NewtonSchulz(steps=5)]


@pytest.mark.parametrize("tr", NEIGHBOURS, ids=lambda t: type(t).__name__)
def test_neighbours_are_scale_invariant_over_the_float32_range(
    tr: aon_func.WeightTransform,
) -> None:
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(7))
    ref = tr.apply({"weight": w})[0]["weight"]
    for c in [1e-30, 1e-10, 1e10, 1e30]:
        out = tr.apply({"weight": w * c})[0]["weight"]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tr", NEIGHBOURS, ids=lambda t: type(t).__name__)
def test_neighbours_map_zero_to_zero_with_zero_gradient(tr: aon_func.WeightTransform) -> None:
    w = torch.zeros(5, 8, requires_grad=True)
    h = tr.apply({"weight": w})[0]["weight"]
    (g,) = torch.autograd.grad(h.sum(), w)
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_polar_gradient_is_finite_at_an_orthogonal_initialisation(shape: tuple[int, int]) -> None:
    w = nn.init.orthogonal_(torch.empty(shape)).requires_grad_()
    h = Polar().apply({"weight": w})[0]["weight"]
    (g,) = torch.autograd.grad((h * torch.randn(shape)).sum(), w)
    assert bool(torch.isfinite(g).all())
    if shape[0] == shape[1]:
        # At an orthogonal Q, polar(Q + t D) = Q + t (D - Q D^T Q) / 2 + O(t^2).
        d = torch.randn(shape, dtype=F64)
        q = nn.init.orthogonal_(torch.empty(shape, dtype=F64))
        _, jvp = torch.func.jvp(lambda x: Polar().apply({"weight": x})[0]["weight"], (q,), (d,))
        torch.testing.assert_close(jvp, (d - q @ d.T @ q) / 2)


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3)])
def test_polar_gradcheck_at_a_generic_point(shape: tuple[int, int]) -> None:
    w = torch.randn(
        shape, dtype=F64, generator=torch.Generator().manual_seed(8), requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda x: Polar().apply({"weight": x})[0]["weight"], (w,))
    assert torch.autograd.gradcheck(
        lambda x: Polar().apply({"weight": x})[0]["weight"],
        (w,),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


@pytest.mark.parametrize(
    "tr", [ONI(iterations=5), NewtonSchulz(steps=5)], ids=lambda t: type(t).__name__
)
def test_iterative_neighbours_have_finite_gradients_at_extreme_scales(
    tr: aon_func.WeightTransform,
) -> None:
    for c in [1e-30, 1e30]:
        w = (torch.randn(6, 10, generator=torch.Generator().manual_seed(9)) * c).requires_grad_()
        h = tr.apply({"weight": w})[0]["weight"]
        (g,) = torch.autograd.grad(h.sum(), w)
        assert bool(torch.isfinite(h).all())
        assert bool(torch.isfinite(g).all())


# ----------------------------------------------------------------------------- 6. transforms are values


def test_transforms_are_hashable_and_equal_by_value() -> None:
    made = [
        AON(),
        AON(order=2),
        AON(order=2, out_axes={"w": 1}),
        ONI(),
        Polar(),
        NewtonSchulz(steps=3),
    ]
    again = [
        AON(),
        AON(order=2),
        AON(order=2, out_axes={"w": 1}),
        ONI(),
        Polar(),
        NewtonSchulz(steps=3),
    ]
    table = {t: i for i, t in enumerate(made)}
    assert len(table) == len(made)
    for i, t in enumerate(again):
        assert t == made[i]
        assert hash(t) == hash(made[i])
        assert table[t] == i
    assert AON(order=2, out_axes={"w": 1}) != AON(order=2, out_axes={"w": 0})
    assert AON(include=["a", "b"]) == AON(include=("b", "a"))
    for t in made:
        assert pickle.loads(pickle.dumps(t)) == t


# ----------------------------------------------------------------------------- 7. value checks


@pytest.mark.parametrize("eps", [1e10, 2e-3, 0.0, -1.0, float("nan"), float("inf")])
def test_eps_outside_its_range_is_refused(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps must be a positive float in \(0, 0.001\]"):
        AON(eps=eps)
    with pytest.raises(ValueError, match="eps"):
        aon(torch.randn(3, 4), eps=eps)


@pytest.mark.parametrize("gain", [float("nan"), float("inf"), 0.0, -2.0])
def test_gains_must_be_finite_and_positive(gain: float) -> None:
    with pytest.raises(ValueError, match="gain must be finite and > 0"):
        AON(gain=gain)
    with pytest.raises(ValueError, match="learnable_gain must be finite and > 0"):
        aon_func.parametrize(nn.Linear(3, 4), learnable_gain=gain)
    with pytest.raises(ValueError, match="init must be finite and > 0"):
        AON().add_gains({"weight": torch.randn(3, 4)}, init=gain)


def test_certified_error_refuses_a_tensor_below_one() -> None:
    with pytest.raises(ValueError, match="kappa must be >= 1"):
        aon_func.certified_error(torch.tensor(0.5), order=2)
    with pytest.raises(ValueError, match="kappa must be >= 1"):
        aon_func.certified_error(torch.tensor([2.0, float("nan")]), order=2)
    assert float(aon_func.certified_error(torch.tensor(2.0), order=2)) == pytest.approx(
        aon_func.certified_error(2.0, order=2)
    )


@pytest.mark.parametrize("training", ["no", 1, None])
def test_training_must_be_a_bool(training: object) -> None:
    with pytest.raises(TypeError, match="training must be True or False"):
        aon(torch.randn(3, 4), torch.ones(3), training=training)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="training must be True or False"):
        AON().apply({"weight": torch.randn(3, 4)}, None, training=training)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_after_parametrize_keeps_the_state_in_float32(dtype: torch.dtype) -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    aon_func.parametrize(net, order=2, generator=torch.Generator().manual_seed(0))
    net.to(dtype)
    out = net(torch.randn(2, 6, dtype=dtype))
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    for m in net.modules():
        if isinstance(m, WeightParametrization):
            assert m.u is not None
            assert m.u.dtype == torch.float32
    assert spectral_norm(net[0].weight.detach()) == pytest.approx(1.0, abs=2e-2)
    net.float()
    assert net(torch.randn(2, 6)).dtype == torch.float32


def test_half_after_double_puts_the_state_in_float32() -> None:
    """A float64 model's ``u`` is float64; after ``.half()`` the kernel wants float32."""
    net = nn.Sequential(nn.Linear(4, 6)).double()
    aon_func.parametrize(net, order=2, generator=torch.Generator().manual_seed(0))
    u64 = next(m.u for m in net.modules() if isinstance(m, WeightParametrization))
    assert u64 is not None
    assert u64.dtype == F64
    net.half()
    out = net(torch.randn(2, 4, dtype=torch.float16))
    assert out.dtype == torch.float16
    assert bool(torch.isfinite(out).all())
    u = next(m.u for m in net.modules() if isinstance(m, WeightParametrization))
    assert u is not None
    assert u.dtype == torch.float32


# ----------------------------------------------------------------------------- properties over scales

ALL_TRANSFORMS = st.sampled_from(
    [AON(order=k) for k in range(9)] + [Polar(), ONI(iterations=5), NewtonSchulz(steps=5)]
)


@st.composite
def scaled_weights(draw: st.DrawFn) -> tuple[Tensor, float, bool]:
    """A float32 weight, a scale over the dtype's range (or exactly zero), and a tall flag."""
    k = draw(st.integers(1, 10))
    n = k + draw(st.integers(0, 10))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(k, n, generator=gen)
    exponent = draw(st.floats(-30.0, 30.0))
    zero = draw(st.booleans()) and draw(st.booleans())  # about a quarter of the examples
    return w, 0.0 if zero else 10.0**exponent, draw(st.booleans())


@given(tr=ALL_TRANSFORMS, case=scaled_weights())
def test_every_transform_is_scale_invariant_and_maps_zero_to_zero(
    tr: aon_func.WeightTransform, case: tuple[Tensor, float, bool]
) -> None:
    w, c, tall = case
    if tall:
        w = w.T.contiguous()
    params = {"weight": w}
    state = tr.init(params, generator=torch.Generator().manual_seed(0))
    wc = (w * c).requires_grad_()
    h = tr.apply({"weight": wc}, state)[0]["weight"]
    (g,) = torch.autograd.grad((h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum(), wc)
    assert bool(torch.isfinite(h).all())
    assert bool(torch.isfinite(g).all())
    if c == 0.0:
        assert torch.equal(h, torch.zeros_like(h))
        assert torch.equal(g, torch.zeros_like(g))
        return
    ref = tr.apply(params, state)[0]["weight"]
    torch.testing.assert_close(h.detach(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "tr",
    [AON(order=0), AON(order=2), Polar(), ONI(iterations=5), NewtonSchulz(steps=5)],
    ids=["sn", "aon-2", "polar", "oni", "ns"],
)
def test_every_transform_propagates_a_non_finite_weight(
    tr: aon_func.WeightTransform, bad: float
) -> None:
    # docs/failure-modes.md, "Summary": NaN and Inf entries propagate to h (no exception,
    # e.g. from the SVD), and a transform's state stays finite.
    g = torch.Generator().manual_seed(0)
    params = {
        "a.weight": torch.randn(4, 6, generator=g),
        "b.weight": torch.randn(4, 6, generator=g),
    }
    state = tr.init(params)
    params["a.weight"][1, 2] = bad
    weights, new_state = tr.apply(params, state)
    assert bool(torch.isnan(weights["a.weight"]).any())
    # Its neighbour in the same bucket is untouched.
    assert bool(torch.isfinite(weights["b.weight"]).all())
    for u in new_state.values():
        assert bool(torch.isfinite(u).all())

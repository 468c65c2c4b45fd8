"""The planning engine: cached plans, buckets, zero padding, and the host work of one ``apply``."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import aon_func
from aon_func import AON, ONI, NewtonSchulz, Polar

F64 = torch.float64


def _resnet50_shapes() -> nn.Module:
    """ResNet-50's conv and linear weights (54 matrices in 15 shape groups), on ``meta``."""
    with torch.device("meta"):
        m = nn.ModuleDict()
        m["stem"] = nn.Conv2d(3, 64, 7, bias=False)
        cin, i = 64, 0
        for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
            out = width * 4
            for b in range(blocks):
                m[f"b{i}a"] = nn.Conv2d(cin, width, 1, bias=False)
                m[f"b{i}b"] = nn.Conv2d(width, width, 3, bias=False)
                m[f"b{i}c"] = nn.Conv2d(width, out, 1, bias=False)
                if b == 0:
                    m[f"b{i}d"] = nn.Conv2d(cin, out, 1, bias=False)
                cin, i = out, i + 1
        m["fc"] = nn.Linear(2048, 1000)
    return m


def _aten_calls(fn: collections.abc.Callable[[], object]) -> int:
    """Top-level ATen calls of the second call of ``fn``, allocations left out."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and not e.name.startswith("aten::empty")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def test_host_work_of_apply_on_the_accelerator_path_is_bounded() -> None:
    """ResNet-50 shapes on ``meta`` (nothing computed, the non-CPU path): the GPU issue's counts.

    v0.1 issued 1,079 ATen calls forward and 2,986 forward+backward; the
    engine's targets (with the stale-state safeguard) are 450 and 1,200.
    """
    model = _resnet50_shapes()
    tr = AON.for_module(model, order=2)
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    state = {
        n: torch.ones(lay.matrix_shape[0], device="meta") for n, lay in tr.select(params).items()
    }
    cots = {k: torch.zeros_like(v) for k, v in params.items()}
    plan = tr.plan(params, state)
    assert len(plan.selected) == 54
    assert len(plan.buckets) <= 6

    def fwd() -> None:
        tr.apply(params, state)

    def fwdbwd() -> None:
        ws, _ = tr.apply(params, state)
        total = sum((ws[k] * cots[k]).sum() for k in cots)
        torch.autograd.grad(total, list(params.values()))

    forward = _aten_calls(fwd)
    both = _aten_calls(fwdbwd)
    assert forward <= 450, forward
    assert both <= 1200, both


def test_a_plan_is_built_once_per_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = AON._build_plan

    def counting(self: AON, *args: object) -> object:
        built.append(1)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AON, "_build_plan", counting)
    tr = AON(order=3, eps=1e-9)  # a configuration no other test uses: its own cache entries
    params = {"a.weight": torch.randn(6, 9), "b.weight": torch.randn(6, 9)}
    state = tr.init(params)
    built.clear()
    for step in range(3):
        new = {k: v + step for k, v in params.items()}  # new values, same structure
        _, state = tr.apply(new, state)
    assert len(built) == 1
    tr.apply({"a.weight": torch.randn(6, 10)})  # another structure: another plan
    assert len(built) == 2


@pytest.fixture
def merge_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU cost model in which a kernel call is all that costs: buckets merge as on a GPU."""
    from aon_func import _plan

    monkeypatch.setitem(
        _plan.COSTS, "cpu", _plan.CostModel(per_call=1.0, per_flop=0.0, per_byte=0.0)
    )


def _mixed_params(requires_grad: bool = False) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    shapes = {
        "a.weight": (8, 20),
        "b.weight": (5, 3, 2, 2),
        "c.weight": (30, 6),
        "d.weight": (8, 20),
    }
    return {
        n: torch.randn(s, generator=gen, dtype=F64).requires_grad_(requires_grad)
        for n, s in shapes.items()
    }


@pytest.mark.usefixtures("merge_everything")
@pytest.mark.parametrize(
    "tr",
    [AON(order=1), AON(order=4), AON(order=0), ONI(iterations=4), NewtonSchulz(steps=3)],
    ids=repr,
)
def test_padded_buckets_equal_the_per_tensor_loop_in_value_and_gradient(
    tr: aon_func.WeightTransform,
) -> None:
    params = _mixed_params(requires_grad=True)
    plan = tr.plan(params)
    assert len(plan.buckets) == 1
    assert plan.buckets[0].size == 4
    loop = dataclasses.replace(tr, batching="loop")
    state = tr.init(params, generator=torch.Generator().manual_seed(0))
    cot = {n: torch.randn(p.shape, dtype=F64) for n, p in params.items()}

    def run(t: aon_func.WeightTransform) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        w, _ = t.apply(params, state)
        total = sum((w[n] * cot[n]).sum() for n in params)
        return w, torch.autograd.grad(total, list(params.values()))

    (w1, g1), (w2, g2) = run(tr), run(loop)
    for n in params:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-12, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.usefixtures("merge_everything")
def test_the_svd_polar_factor_never_pads() -> None:
    plan = Polar().plan(_mixed_params())
    for bucket in plan.buckets:
        assert {(g.k, g.n) for g in bucket.groups} == {(bucket.k, bucket.n)}
    assert len(plan.buckets) == 3  # a and d share a shape; b and c stand alone


@pytest.mark.usefixtures("merge_everything")
def test_padded_buckets_work_under_vmap_over_an_ensemble() -> None:
    members = [_mixed_params() for _ in range(3)]
    for i, m in enumerate(members):
        for t in m.values():
            t.mul_(1 + i)  # different members (and scales: AON is scale-invariant)
    stacked = {n: torch.stack([m[n] for m in members]) for n in members[0]}
    tr = AON(order=2)
    states = [tr.init(m, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(members)]
    stacked_state = {n: torch.stack([s[n] for s in states]) for n in states[0]}
    w, _ = torch.func.vmap(tr.apply)(stacked, stacked_state)
    for i, (m, s) in enumerate(zip(members, states, strict=True)):
        wi, _ = AON(order=2, batching="loop").apply(m, s)
        for n in m:
            torch.testing.assert_close(w[n][i], wi[n], atol=1e-12, rtol=0)


def test_accelerator_buckets_cover_every_matrix_with_room_to_spare() -> None:
    model = _resnet50_shapes()
    tr = AON.for_module(model)
    params = dict(model.named_parameters())
    plan = tr.plan(params)
    names = [n for b in plan.buckets for n in b.names]
    assert sorted(names) == sorted(tr.select(params))
    layouts = dict(plan.selected)
    for b in plan.buckets:
        for n in b.names:
            k, n_cols = layouts[n].matrix_shape
            assert k <= b.k
            assert n_cols <= b.n

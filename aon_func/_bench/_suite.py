"""The measurements of ``aon-func bench``: apply, neighbours, roofline, memory, training step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from aon_func import AON, ONI, Layout, NewtonSchulz, Plan, Polar, WeightTransform, aon

from ._models import MODELS, STEP_MODELS
from ._timing import Timings, count_calls, peak_extra_bytes, quiet_profiler, time_interleaved

State = dict[str, Tensor]

__all__ = [
    "BenchConfig",
    "bench_apply",
    "bench_memory",
    "bench_neighbours",
    "bench_step",
    "describe_plan",
    "roofline_products",
]


class BenchConfig(NamedTuple):
    """Options shared by every measurement."""

    order: int
    repeats: int
    warmup: int
    budget_s: float
    compile: tuple[str, ...]
    dtype: torch.dtype
    clock: str = "wall"
    profile: bool = False


Fn = Callable[[], object]

ORTHOGONAL_BACKWARD_LIMIT = 5e9
"""Largest sum of ``k N^2`` over a model's matrices for which the orthogonal
parametrizations' backward is timed (the 8-layer MLP: 1.1e9; ViT-S/16: 2.9e10; ResNet-18: 4.0e10)."""


def _model_params(
    name: str, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, Layout]]:
    """The weights ``AON.for_module`` selects in model ``name``, as leaves that require grad.

    The module is built on ``device`` directly (on ``meta`` nothing is allocated).
    """
    torch.manual_seed(0)
    with torch.device(device):
        module = MODELS[name].build()
    probe = AON.for_module(module)
    named = dict(module.named_parameters())
    params = {
        n: named[n].detach().to(dtype=dtype).requires_grad_()
        for n in sorted(probe.include)  # type: ignore[arg-type]
    }
    out_axes = dict(probe.out_axes)
    layouts = probe.select(params)
    return params, out_axes, layouts


def describe_plan(plan: Plan) -> str:
    """``"3 calls: 42 x 256x2304, 3 x 512x4608, 1 x 10x512"``: the kernel calls of a plan."""
    cells = [f"{b.size} x {b.k}x{b.n}" for b in plan.buckets]
    head = f"{len(cells)} call{'s' if len(cells) != 1 else ''}"
    if len(cells) > 6:
        cells = [*cells[:5], f"... ({len(cells) - 5} more)"]
    return f"{head}: {', '.join(cells)}"


def op_counts(name: str, device: torch.device, order: int) -> dict[str, Any]:
    """ATen calls of ``AON.apply`` (batching ``"auto"``) on ``device``: forward and forward+backward.

    On ``meta`` nothing is computed and the accelerator code path runs: the
    host work of a GPU run, measurable without one. On CUDA the kernel
    launches are counted too.
    """
    params, out_axes, layouts = _model_params(name, device, torch.float32)
    tr = AON(include=frozenset(params), out_axes=out_axes, order=order)
    state = {
        n: torch.nn.functional.normalize(torch.ones(lay.matrix_shape[0], device=device), dim=0)
        for n, lay in layouts.items()
    }
    fwd = _weights_of(tr, params, state)
    out: dict[str, Any] = {"device": str(device), "plan": describe_plan(tr.plan(params, state))}
    out["fwd"] = count_calls(fwd, device)
    out["fwd+bwd"] = count_calls(_fwd_bwd(fwd, list(params.values())), device)
    return out


def _fwd_bwd(forward: Callable[[], Sequence[Tensor]], inputs: Sequence[Tensor]) -> Fn:
    """Forward, then the vector-Jacobian product with fixed cotangents (no ``.grad`` accumulation)."""
    cotangents: list[Tensor] = []

    def run() -> object:
        outs = forward()
        if not cotangents:
            dev = outs[0].device
            gen = torch.Generator(device=dev).manual_seed(1) if dev.type != "meta" else None
            cotangents.extend(
                torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device) for o in outs
            )
        return torch.autograd.grad(outs, inputs, cotangents)

    return run


def _weights_of(
    tr: WeightTransform | Callable[..., Any], params: dict[str, Tensor], state: State
) -> Callable[[], list[Tensor]]:
    apply = tr.apply if isinstance(tr, WeightTransform) else tr

    def forward() -> list[Tensor]:
        weights, _ = apply(params, state)
        return [weights[n] for n in params]

    return forward


def roofline_products(
    layouts: dict[str, Layout], order: int, *, backward: bool
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Operand shapes of the matrix products AON issues, batched per group of equal shapes.

    Forward, per ``k x N`` matrix: the Gram ``Z Z^T`` (``k x N @ N x k``),
    ``K - 1`` Horner products (``k x k @ k x k``) and the final ``P Z``
    (``k x k @ k x N``). With ``backward``, each forward product ``A @ B``
    adds the two of its vector-Jacobian product, ``dC @ B^T`` and
    ``A^T @ dC`` (same FLOPs), except the Gram, whose symmetric backward
    ``(dG + dG^T) Z`` is one product. The power iteration's matrix-vector
    products are left out (``O(kN)``, bandwidth-bound).
    """
    counts: dict[tuple[int, int], int] = {}
    for layout in layouts.values():
        shape = layout.matrix_shape
        counts[shape] = counts.get(shape, 0) + 1
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for (k, n), c in counts.items():
        b = (c,) if c > 1 else ()
        fwd = [((k, n), (n, k))] + [((k, k), (k, k))] * (order - 1) + [((k, k), (k, n))]
        prods = list(fwd)
        if backward:
            prods.append(((k, k), (k, n)))  # Gram: (dG + dG^T) @ Z
            for a, bb in fwd[1:]:
                prods.append(((a[0], bb[1]), (bb[1], bb[0])))  # dC @ B^T
                prods.append(((a[1], a[0]), (a[0], bb[1])))  # A^T @ dC
        out.extend(((*b, *x), (*b, *y)) for x, y in prods)
    return out


def _roofline_fn(
    products: list[tuple[tuple[int, ...], tuple[int, ...]]],
    device: torch.device,
    dtype: torch.dtype,
) -> Fn:
    gen = torch.Generator(device=device).manual_seed(2)
    ops = [
        (
            torch.randn(a, generator=gen, device=device, dtype=dtype),
            torch.randn(b, generator=gen, device=device, dtype=dtype),
        )
        for a, b in products
    ]

    def run() -> object:
        return [torch.matmul(a, b) for a, b in ops]

    return run


def _flops(products: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> float:
    total = 0.0
    for a, b in products:
        batch = a[0] if len(a) == 3 else 1
        total += 2.0 * batch * a[-2] * a[-1] * b[-1]
    return total


def bench_apply(name: str, device: torch.device, cfg: BenchConfig) -> dict[str, Any]:
    """(a) and (c): ``AON.apply`` batched, looped, per-layer kernel loop, compiled; roofline."""
    params, out_axes, layouts = _model_params(name, device, cfg.dtype)
    include = frozenset(params)
    trs = {
        b: AON(include=include, out_axes=out_axes, order=cfg.order, batching=b)
        for b in ("auto", "vmap", "loop")
    }
    state = trs["auto"].init(params, generator=torch.Generator(device=device).manual_seed(0))
    inputs = list(params.values())
    names = list(params)
    order = cfg.order

    def kernel_loop() -> list[Tensor]:
        return [
            aon(params[n], state[n], order=order, out_axis=out_axes.get(n, 0))[0] for n in names
        ]

    forwards: dict[str, Callable[[], Sequence[Tensor]]] = {
        "apply auto": _weights_of(trs["auto"], params, state),
        "apply vmap": _weights_of(trs["vmap"], params, state),
        "apply loop": _weights_of(trs["loop"], params, state),
        "kernel loop": kernel_loop,
    }
    compile_s = None
    if name in cfg.compile:
        compiled = torch.compile(trs["auto"].apply)
        forwards["compiled"] = _weights_of(compiled, params, state)
        t0 = time.perf_counter()
        _fwd_bwd(forwards["compiled"], inputs)()
        compile_s = time.perf_counter() - t0
    fns: dict[str, Fn] = {}
    for key, fwd in forwards.items():
        fns[f"{key}/fwd"] = fwd
        fns[f"{key}/fwd+bwd"] = _fwd_bwd(fwd, inputs)
    prods = {
        mode: roofline_products(layouts, order, backward=mode == "fwd+bwd")
        for mode in ("fwd", "fwd+bwd")
    }
    for mode, p in prods.items():
        fns[f"roofline/{mode}"] = _roofline_fn(p, device, cfg.dtype)
    t = time_interleaved(
        fns, device, repeats=cfg.repeats, warmup=cfg.warmup, budget_s=cfg.budget_s, clock=cfg.clock
    )
    auto = "apply auto"
    profile = _profile(fns[f"{auto}/fwd+bwd"]) if cfg.profile else None
    calls = {mode: count_calls(fns[f"{auto}/{mode}"], device) for mode in ("fwd", "fwd+bwd")}
    rows: dict[str, Any] = {}
    for key in (*forwards, "roofline"):
        rows[key] = {}
        for mode in ("fwd", "fwd+bwd"):
            rows[key][mode] = {
                "ms": 1e3 * t.median(f"{key}/{mode}"),
                "over_roofline": t.ratio(f"{key}/{mode}", f"roofline/{mode}"),
                "over_kernel_loop": t.ratio(f"{key}/{mode}", f"kernel loop/{mode}"),
                "spread": t.spread(f"{key}/{mode}"),
            }
    return {
        "model": MODELS[name].description,
        "n_matrices": len(params),
        "n_groups": len({lay.matrix_shape for lay in layouts.values()}),
        "param_bytes": sum(p.numel() * p.element_size() for p in inputs),
        "order": order,
        "auto": auto,
        "plan": describe_plan(trs["auto"].plan(params, state)),
        "calls": calls,
        "rounds": len(t.rounds),
        "compile_s": compile_s,
        "roofline_gflop": {m: _flops(p) / 1e9 for m, p in prods.items()},
        "rows": rows,
        "profile": profile,
    }


def _profile(fn: Fn, runs: int = 3) -> list[dict[str, Any]]:
    """Self CPU time per op of ``fn`` (``torch.profiler``, ``runs`` calls), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    rows = [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3 / runs,
            "calls": e.count // runs,
        }
        for e in prof.key_averages()
    ]
    total = sum(r["self_ms"] for r in rows)
    for r in rows:
        r["share"] = r["self_ms"] / total if total else 0.0
    return sorted(rows, key=lambda r: -r["self_ms"])


def _holders(
    params: dict[str, Tensor], layouts: dict[str, Layout], register: Callable[[nn.Module], object]
) -> tuple[list[nn.Module], list[Tensor]]:
    """One module per weight, holding its ``d_out x rest`` matrix, with a parametrization."""
    mods: list[nn.Module] = []
    for n, w in params.items():
        m = nn.Module()
        axis = layouts[n].out_axis
        z = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1)  # d_out x rest
        m.weight = nn.Parameter(z.contiguous().clone())
        register(m)
        mods.append(m)
    inputs: list[Tensor] = [p for m in mods for p in m.parameters()]
    return mods, inputs


def bench_neighbours(name: str, device: torch.device, cfg: BenchConfig) -> dict[str, Any]:
    """(b): the same work by AON's neighbours, side by side with AON."""
    params, out_axes, layouts = _model_params(name, device, cfg.dtype)
    include = frozenset(params)
    inputs = list(params.values())
    common: dict[str, Any] = {"include": include, "out_axes": out_axes}
    aon_tr = AON(order=cfg.order, **common)
    state = aon_tr.init(params, generator=torch.Generator(device=device).manual_seed(0))
    forwards: dict[str, tuple[Callable[[], Sequence[Tensor]], list[Tensor]]] = {
        f"AON K={cfg.order}": (_weights_of(aon_tr, params, state), inputs),
        "SN (AON K=0)": (_weights_of(AON(order=0, **common), params, state), inputs),
        "polar (SVD)": (_weights_of(Polar(**common), params, {}), inputs),
        "ONI (5 Newton steps)": (_weights_of(ONI(iterations=5, **common), params, {}), inputs),
        "Newton-Schulz (5 steps)": (
            _weights_of(NewtonSchulz(steps=5, **common), params, {}),
            inputs,
        ),
    }
    skipped: dict[str, str] = {}
    parametrizations = nn.utils.parametrizations

    def holder_forward(mods: list[nn.Module]) -> Callable[[], list[Tensor]]:
        return lambda: [m.weight for m in mods]  # type: ignore[misc]

    registrations: dict[str, Callable[[nn.Module], object]] = {
        "torch spectral_norm": lambda m: parametrizations.spectral_norm(m),
        "torch orthogonal": lambda m: parametrizations.orthogonal(m),
    }
    try:
        import geotorch

        registrations["geotorch orthogonal"] = lambda m: geotorch.orthogonal(m, "weight")
    except ImportError:
        skipped["geotorch orthogonal"] = "geotorch is not installed (pip install 'aon-func[bench]')"
    for key, register in registrations.items():
        mods, hold_inputs = _holders(params, layouts, register)
        forwards[key] = (holder_forward(mods), hold_inputs)
    # The orthogonal maps' backward (Householder product, matrix exponential)
    # grows like k N^2 per matrix and takes minutes on ResNet-18's shapes.
    cost = sum(lay.matrix_shape[0] * lay.matrix_shape[1] ** 2 for lay in layouts.values())
    no_backward = set()
    if cost > ORTHOGONAL_BACKWARD_LIMIT:
        for key in forwards:
            if key.endswith("orthogonal"):
                no_backward.add(key)
                skipped[f"{key} fwd+bwd"] = (
                    f"not run: sum of k N^2 over the matrices is {cost:.1e} > "
                    f"{ORTHOGONAL_BACKWARD_LIMIT:.0e} (the backward would take minutes)"
                )
    fns: dict[str, Fn] = {}
    for key, (fwd, ins) in forwards.items():
        fns[f"{key}/fwd"] = fwd
        if key not in no_backward:
            fns[f"{key}/fwd+bwd"] = _fwd_bwd(fwd, ins)
    # Warm up only what is fast: a call that takes seconds (SVD, Householder,
    # matrix exponential) has no one-time cost worth a second call.
    for f in fns.values():
        start = time.perf_counter()
        f()
        if time.perf_counter() - start > 1.0:
            continue
        for _ in range(cfg.warmup - 1):
            f()
    t = time_interleaved(
        fns,
        device,
        repeats=cfg.repeats,
        warmup=0,
        budget_s=cfg.budget_s,
        clock=cfg.clock,
        min_rounds=2,
    )
    ref = f"AON K={cfg.order}"
    rows = {
        key: {
            mode: {
                "ms": 1e3 * t.median(f"{key}/{mode}"),
                "over_aon": t.ratio(f"{key}/{mode}", f"{ref}/{mode}"),
                "spread": t.spread(f"{key}/{mode}"),
            }
            if f"{key}/{mode}" in fns
            else None
            for mode in ("fwd", "fwd+bwd")
        }
        for key in forwards
    }
    return {
        "model": MODELS[name].description,
        "rounds": len(t.rounds),
        "rows": rows,
        "skipped": skipped,
    }


def bench_memory(
    name: str, device: torch.device, cfg: BenchConfig, orders: Sequence[int]
) -> dict[str, Any]:
    """(3): peak extra memory of forward+backward through ``apply``, over the weights' bytes."""
    params, out_axes, _ = _model_params(name, device, cfg.dtype)
    inputs = list(params.values())
    param_bytes = sum(p.numel() * p.element_size() for p in inputs)
    out: dict[str, Any] = {"param_bytes": param_bytes, "rows": {}}
    for k in orders:
        for batching in ("auto", "loop"):
            tr = AON(include=frozenset(params), out_axes=out_axes, order=k, batching=batching)
            state = tr.init(params)
            run = _fwd_bwd(_weights_of(tr, params, state), inputs)
            run()  # cotangents allocated outside the measured call
            peak = peak_extra_bytes(run, device)
            out["rows"][f"K={k} {batching}"] = {
                "peak_bytes": peak,
                "over_params": peak / param_bytes,
            }
    return out


def bench_step(name: str, device: torch.device, cfg: BenchConfig) -> dict[str, Any]:
    """(d): training-step time with AON on every linear map over the step without it."""
    spec = STEP_MODELS[name]
    torch.manual_seed(0)
    model = spec.build().to(device=device, dtype=cfg.dtype).train()
    buffers = dict(model.named_buffers())
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((spec.batch, *spec.input_shape), generator=gen, device=device, dtype=cfg.dtype)
    y = torch.randint(0, spec.n_classes, (spec.batch,), generator=gen, device=device)
    tr = AON.for_module(model, order=cfg.order)

    def fresh() -> tuple[dict[str, Tensor], torch.optim.Optimizer]:
        ps = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        opt: torch.optim.Optimizer
        if spec.optimizer == "adam":
            opt = torch.optim.Adam(ps.values(), lr=1e-3)
        else:
            opt = torch.optim.SGD(ps.values(), lr=1e-2, momentum=0.9)
        return ps, opt

    plain_params, plain_opt = fresh()
    aon_params, aon_opt = fresh()
    state = [tr.init(aon_params)]

    def step_plain() -> object:
        out = torch.func.functional_call(model, {**buffers, **plain_params}, (x,))
        nn.functional.cross_entropy(out, y).backward()  # type: ignore[no-untyped-call]
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return None

    def step_aon() -> object:
        out, state[0] = tr.functional_call(model, aon_params, state[0], x)
        nn.functional.cross_entropy(out, y).backward()  # type: ignore[no-untyped-call]
        aon_opt.step()
        aon_opt.zero_grad(set_to_none=True)
        return None

    t: Timings = time_interleaved(
        {"plain": step_plain, "aon": step_aon},
        device,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        budget_s=cfg.budget_s,
        clock=cfg.clock,
    )
    return {
        "model": spec.description,
        "order": cfg.order,
        "rounds": len(t.rounds),
        "plain_ms": 1e3 * t.median("plain"),
        "aon_ms": 1e3 * t.median("aon"),
        "overhead": t.ratio("aon", "plain"),
        "spread": max(t.spread("plain"), t.spread("aon")),
    }

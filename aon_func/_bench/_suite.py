"""The measurements of ``aon-func bench``: apply, neighbours, roofline, memory, training step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from aon_func import AON, ONI, Layout, NewtonSchulz, Plan, Polar, WeightTransform, aon

from ._models import MODELS, STEP_MODELS
from ._timing import (
    Timings,
    count_calls,
    peak_extra_bytes,
    quiet_profiler,
    synchronize,
    time_interleaved,
)

State = dict[str, Tensor]

__all__ = [
    "BenchConfig",
    "bench_apply",
    "bench_memory",
    "bench_neighbours",
    "bench_step",
    "compiled_key",
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
    matmul_dtype: torch.dtype | None = None
    """``AON(matmul_dtype=...)``: ``torch.bfloat16`` for ``--dtype bfloat16`` (the roofline too)."""
    compile_modes: tuple[str, ...] = ("default",)
    """``torch.compile`` modes of the compiled rows: ``default``, and ``reduce-overhead`` on CUDA."""
    compile_steps: bool = False
    """Also time the training steps with their forward and loss compiled."""


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


def compiled_key(mode: str) -> str:
    """The row of a ``torch.compile`` mode: ``compiled`` (default mode), ``compiled reduce-overhead``."""
    return "compiled" if mode == "default" else f"compiled {mode}"


def _compiled(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``torch.compile(fn, mode=...)``; with CUDA graphs, each call starts a new step."""
    compiled = torch.compile(fn, mode=None if mode == "default" else mode)
    if mode != "reduce-overhead":
        return compiled

    def call(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        return compiled(*args, **kwargs)

    return call


def bench_apply(name: str, device: torch.device, cfg: BenchConfig) -> dict[str, Any]:
    """(a) and (c): ``AON.apply`` batched, looped, per-layer kernel loop, compiled; roofline."""
    params, out_axes, layouts = _model_params(name, device, cfg.dtype)
    include = frozenset(params)
    md = cfg.matmul_dtype
    trs = {
        b: AON(include=include, out_axes=out_axes, order=cfg.order, batching=b, matmul_dtype=md)
        for b in ("auto", "vmap", "loop")
    }
    state = trs["auto"].init(params, generator=torch.Generator(device=device).manual_seed(0))
    inputs = list(params.values())
    names = list(params)
    order = cfg.order

    def kernel_loop() -> list[Tensor]:
        return [
            aon(params[n], state[n], order=order, out_axis=out_axes.get(n, 0), matmul_dtype=md)[0]
            for n in names
        ]

    forwards: dict[str, Callable[[], Sequence[Tensor]]] = {
        "apply auto": _weights_of(trs["auto"], params, state),
        "apply vmap": _weights_of(trs["vmap"], params, state),
        "apply loop": _weights_of(trs["loop"], params, state),
        "kernel loop": kernel_loop,
    }
    compile_s: dict[str, float] = {}
    compile_failed: dict[str, str] = {}
    if name in cfg.compile:
        for mode in cfg.compile_modes:
            key = compiled_key(mode)
            fwd = _weights_of(_compiled(trs["auto"].apply, mode), params, state)
            t0 = time.perf_counter()
            try:  # the forward and the backward graphs are compiled here, before timing
                _fwd_bwd(fwd, inputs)()
                synchronize(device)
            except Exception as exc:  # a failed mode is reported, not fatal
                compile_failed[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            compile_s[key] = time.perf_counter() - t0
            forwards[key] = fwd
    fns: dict[str, Fn] = {}
    for key, forward in forwards.items():
        fns[f"{key}/fwd"] = forward
        fns[f"{key}/fwd+bwd"] = _fwd_bwd(forward, inputs)
    prods = {
        mode: roofline_products(layouts, order, backward=mode == "fwd+bwd")
        for mode in ("fwd", "fwd+bwd")
    }
    for mode, p in prods.items():
        fns[f"roofline/{mode}"] = _roofline_fn(p, device, md or cfg.dtype)
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
        "compile_s": compile_s.get("compiled"),
        "compile_s_by_row": compile_s,
        "compile_failed": compile_failed,
        "matmul_dtype": str(md or cfg.dtype),
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
    aon_tr = AON(order=cfg.order, matmul_dtype=cfg.matmul_dtype, **common)
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
            tr = AON(
                include=frozenset(params),
                out_axes=out_axes,
                order=k,
                batching=batching,
                matmul_dtype=cfg.matmul_dtype,
            )
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
    """(d): training-step time with AON on every linear map over the step without it.

    With ``cfg.matmul_dtype = torch.bfloat16`` both steps run their forward
    and loss under ``torch.autocast(dtype=torch.bfloat16)`` and AON runs its
    products in bf16 (autocast does not reach the kernel). With
    ``cfg.compile_steps`` the forward and loss of both are also compiled in
    each of ``cfg.compile_modes`` (backward and optimiser eager), timed in
    the same rounds.
    """
    spec = STEP_MODELS[name]
    torch.manual_seed(0)
    model = spec.build().to(device=device, dtype=cfg.dtype).train()
    buffers = dict(model.named_buffers())
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((spec.batch, *spec.input_shape), generator=gen, device=device, dtype=cfg.dtype)
    y = torch.randint(0, spec.n_classes, (spec.batch,), generator=gen, device=device)
    tr = AON.for_module(model, order=cfg.order, matmul_dtype=cfg.matmul_dtype)
    autocast = cfg.matmul_dtype == torch.bfloat16

    def fresh() -> tuple[dict[str, Tensor], torch.optim.Optimizer]:
        ps = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        opt: torch.optim.Optimizer
        if spec.optimizer == "adam":
            opt = torch.optim.Adam(ps.values(), lr=1e-3)
        else:
            opt = torch.optim.SGD(ps.values(), lr=1e-2, momentum=0.9)
        return ps, opt

    def loss_plain(ps: dict[str, Tensor]) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = torch.func.functional_call(model, {**buffers, **ps}, (x,))
            return nn.functional.cross_entropy(out, y)

    def loss_aon(ps: dict[str, Tensor], s: State) -> tuple[Tensor, State]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out, s = tr.functional_call(model, ps, s, x)
            return nn.functional.cross_entropy(out, y), s

    def make_steps(
        plain_loss: Callable[..., Tensor], aon_loss: Callable[..., tuple[Tensor, State]]
    ) -> dict[str, Fn]:
        plain_params, plain_opt = fresh()
        aon_params, aon_opt = fresh()
        state = [tr.init(aon_params)]

        def step_plain() -> object:
            plain_loss(plain_params).backward()  # type: ignore[no-untyped-call]
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
            return None

        def step_aon() -> object:
            loss, state[0] = aon_loss(aon_params, state[0])
            loss.backward()  # type: ignore[no-untyped-call]
            aon_opt.step()
            aon_opt.zero_grad(set_to_none=True)
            return None

        return {"plain": step_plain, "aon": step_aon}

    fns = make_steps(loss_plain, loss_aon)
    compile_s: dict[str, float] = {}
    compile_failed: dict[str, str] = {}
    for mode in cfg.compile_modes if cfg.compile_steps else ():
        key = compiled_key(mode)
        steps = make_steps(_compiled(loss_plain, mode), _compiled(loss_aon, mode))
        try:
            for which, fn in steps.items():
                t0 = time.perf_counter()
                fn()  # compiles the forward and, at its first backward, the backward graph
                fn()
                synchronize(device)
                compile_s[f"{which} {key}"] = time.perf_counter() - t0
        except Exception as exc:  # a failed mode is reported, not fatal
            compile_failed[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        fns.update({f"{which} {key}": fn for which, fn in steps.items()})

    t: Timings = time_interleaved(
        fns,
        device,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        budget_s=cfg.budget_s,
        clock=cfg.clock,
    )
    compiled = {
        key: {
            "plain_ms": 1e3 * t.median(f"plain {key}"),
            "aon_ms": 1e3 * t.median(f"aon {key}"),
            "overhead": t.ratio(f"aon {key}", f"plain {key}"),
            "aon_over_eager_aon": t.ratio(f"aon {key}", "aon"),
            "compile_s": compile_s[f"plain {key}"] + compile_s[f"aon {key}"],
        }
        for key in (compiled_key(m) for m in cfg.compile_modes)
        if f"aon {key}" in fns
    }
    return {
        "model": spec.description,
        "order": cfg.order,
        "autocast_bf16": autocast,
        "rounds": len(t.rounds),
        "plain_ms": 1e3 * t.median("plain"),
        "aon_ms": 1e3 * t.median("aon"),
        "overhead": t.ratio("aon", "plain"),
        "spread": max(t.spread(k) for k in fns),
        "compiled": compiled,
        "compile_failed": compile_failed,
    }

"""AON under ``torch.compile``: one graph (``fullgraph=True``), no recompiles across steps.

Covered: the per-tensor kernel, ``AON.apply``, ``AON.functional_call`` and a
whole training step (``torch.func.grad_and_value`` plus an SGD update), each
over several steps with new parameter values and the same structure, which
must reuse the first graph: ``torch._dynamo.config.error_on_recompile`` makes
a recompile an error, and a counting backend checks that one frame was
compiled. Compiled results equal eager ones.

Backends. Inductor's code generation takes 20-60 s per graph on a small CPU,
so most cases use ``"aot_eager"`` (Dynamo's capture, its guards and
AOTAutograd's trace of forward and backward: every property tested here
except Inductor's kernels), and one case, ``apply`` forward and backward,
runs the default mode (Inductor) for real. On CUDA, the same cases also run in the
default mode and in ``"reduce-overhead"`` (CUDA graphs); without CUDA they are
skipped with the reason. ``tests/test_transform_usecases.py`` compiles the
training steps of four model kinds (one with Inductor) for 20 steps each.

The two code paths. Dynamo cannot trace a custom ``jvp``, so compiled code
runs the kernel's autograd Functions without one (``_GramZv``, ``_ScaledMm``)
and eager code the subclasses that add it (forward mode: ``jvp``,
``jacfwd``). ``test_the_compiled_code_path_equals_the_eager_one`` runs the
compiled path in eager and checks values, gradients, grad-of-grad and vmap
against the eager path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from aon_func import AON, aon

F64 = torch.float64

_NO_CUDA = "CUDA is not available (torch.cuda.is_available() is False): the CPU cases cover Dynamo"


def _modes() -> list[Any]:
    """``(device, backend, mode)``: aot_eager on the CPU; Inductor default and CUDA graphs on CUDA."""
    cuda = () if torch.cuda.is_available() else (pytest.mark.skip(reason=_NO_CUDA),)
    return [
        pytest.param("cpu", "aot_eager", None, id="cpu-aot_eager"),
        pytest.param("cuda", "inductor", "default", id="cuda-default", marks=cuda),
        pytest.param("cuda", "inductor", "reduce-overhead", id="cuda-reduce-overhead", marks=cuda),
    ]


def _compile(fn: Callable[..., Any], backend: str, mode: str | None) -> tuple[Any, Any]:
    """``(compiled fn, frame counter)``: fullgraph, counting the frames Dynamo compiles."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    if mode is None:
        return torch.compile(fn, fullgraph=True, backend=counter), counter
    # A mode needs Inductor, which the counting backend cannot carry: Dynamo's stats count it.
    return torch.compile(fn, fullgraph=True, mode=mode), None


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _assert_one_graph(counter: Any, graphs_before: int) -> None:
    """One frame compiled, into one graph (the counting backend where there is one; Dynamo's stats)."""
    if counter is not None:
        assert counter.frame_count == 1
    assert _unique_graphs() - graphs_before == 1


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def _params(device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    shapes = {
        "a.weight": (16, 24),
        "b.weight": (16, 24),
        "c.weight": (8, 4, 3, 3),
        "d.weight": (30, 7),
    }
    return {n: torch.randn(s, generator=gen).to(device) for n, s in shapes.items()}


def _close(a: Any, b: Any, **tol: float) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], **tol)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


def _run_steps(
    eager: Callable[..., Any],
    compiled: Callable[..., Any],
    inputs: Callable[[int], tuple[Any, ...]],
    steps: int,
    **tol: float,
) -> None:
    """Call both on ``steps`` inputs of the same structure; no recompile allowed; results equal."""
    with patch.object(torch._dynamo.config, "error_on_recompile", True):
        for i in range(steps):
            args = inputs(i)
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (else a no-op)
            _close(compiled(*args), eager(*args), **tol)


# ----------------------------------------------------------------------------- the kernel


KERNEL_CASES = [
    pytest.param((16, 24), 0, 2, "state", id="wide-K2-state"),
    pytest.param((12, 3, 2, 2), 1, 0, "state", id="convT4d-K0-state"),
    pytest.param((20, 6), 0, 3, "stateless", id="tall-K3-stateless"),
    pytest.param((5, 4, 3, 2, 2), 0, 1, "grad", id="conv5d-K1-grad"),
]


@pytest.mark.parametrize(("shape", "out_axis", "order", "mode"), KERNEL_CASES)
def test_kernel_compiles_to_one_graph_equal_to_eager(
    shape: tuple[int, ...], out_axis: int, order: int, mode: str
) -> None:
    """``aon`` (and its gradient) in one graph, reused for new weights, == eager."""
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(shape, generator=gen)
    k = min(shape[out_axis], w.numel() // shape[out_axis])
    u = torch.nn.functional.normalize(torch.randn(k, generator=gen), dim=0)
    c = torch.randn(shape, generator=gen)
    if mode == "state":

        def f(w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return aon(w, u, order=order, n_power_iterations=1, out_axis=out_axis)

    elif mode == "stateless":

        def f(w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            return aon(w, order=order, out_axis=out_axis)

    else:

        def f(w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            def loss(w: Tensor) -> Tensor:
                return (aon(w, u, order=order, out_axis=out_axis)[0] * c).sum()

            return torch.func.grad(loss)(w), u

    torch._dynamo.reset()
    try:
        graphs = _unique_graphs()
        compiled, counter = _compile(f, "aot_eager", None)
        _run_steps(f, compiled, lambda i: (w * (1 + i), u), 3, atol=2e-5, rtol=1e-4)
        _assert_one_graph(counter, graphs)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize(("device", "backend", "mode"), _modes())
def test_apply_and_its_gradient_compile_once(device: str, backend: str, mode: str | None) -> None:
    dev = torch.device(device)
    params = _params(dev)
    tr = AON(order=2)
    state = tr.init(params, generator=torch.Generator().manual_seed(2))
    c = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(dev)
        for n, p in params.items()
    }

    def f(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Any, ...]:
        def loss(p: dict[str, Tensor]) -> tuple[Tensor, Any]:
            w, s_new = tr.apply(p, s)
            return sum((w[n] * c[n]).sum() for n in w), (w, s_new)  # type: ignore[return-value]

        grads, (w, s_new) = torch.func.grad(loss, has_aux=True)(p)
        return w, s_new, grads

    torch._dynamo.reset()
    try:
        graphs = _unique_graphs()
        compiled, counter = _compile(f, backend, mode)

        def inputs(i: int) -> tuple[Any, ...]:  # new values each step, the same structure
            return {n: p * (1 + 0.5 * i) + 0.01 * i for n, p in params.items()}, state

        _run_steps(f, compiled, inputs, 4, atol=1e-5, rtol=1e-4)
        _assert_one_graph(counter, graphs)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_apply_forward_and_backward_under_inductor_default_mode() -> None:
    """The one CPU compile through Inductor here: ``apply`` fwd+bwd over three steps, == eager."""
    params = {n: p.requires_grad_() for n, p in _params(torch.device("cpu")).items()}
    tr = AON(order=2)
    state = tr.init(params, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(tr.apply, fullgraph=True)
    torch._dynamo.reset()
    try:
        with patch.object(torch._dynamo.config, "error_on_recompile", True):
            for i in range(3):
                p = {n: (w.detach() * (1 + i)).requires_grad_() for n, w in params.items()}
                got_w, got_s = compiled(p, state)
                want_w, want_s = tr.apply(p, state)
                _close(got_w, want_w, atol=2e-5, rtol=1e-4)
                _close(got_s, want_s, atol=2e-5, rtol=1e-4)
                names = list(p)
                g_got = torch.autograd.grad([got_w[n].sum() for n in names], [p[n] for n in names])
                g_want = torch.autograd.grad(
                    [want_w[n].sum() for n in names], [p[n] for n in names]
                )
                _close(g_got, g_want, atol=1e-4, rtol=1e-3)
                state = want_s
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- functional_call, a step


@pytest.mark.parametrize(("device", "backend", "mode"), _modes())
def test_functional_call_compiles_once(device: str, backend: str, mode: str | None) -> None:
    dev = torch.device(device)
    net = _mlp().to(dev)
    tr = AON.for_module(net, order=2)
    params = {n: p.detach() for n, p in net.named_parameters()}
    state = tr.init(params, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5)).to(dev)

    def f(p: dict[str, Tensor], s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Any]:
        out: Tensor
        out, s = tr.functional_call(net, p, s, (x,))
        return out, s

    torch._dynamo.reset()
    try:
        graphs = _unique_graphs()
        compiled, counter = _compile(f, backend, mode)
        _run_steps(
            f,
            compiled,
            lambda i: ({n: v * (1 + 0.1 * i) for n, v in params.items()}, state, x * i),
            3,
            atol=1e-5,
            rtol=1e-4,
        )
        _assert_one_graph(counter, graphs)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(("device", "backend", "mode"), _modes())
def test_training_step_compiles_once_and_follows_eager(
    device: str, backend: str, mode: str | None
) -> None:
    """Five SGD steps with gains and a state: one graph; each compiled step == the eager one."""
    dev = torch.device(device)
    net = _mlp().to(dev)
    tr = AON.for_module(net, order=2)
    params = tr.add_gains({n: p.detach() for n, p in net.named_parameters()}, init=1.5)
    state = tr.init(params, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    x, y = (
        torch.randn(8, 6, generator=gen).to(dev),
        torch.randint(0, 3, (8,), generator=gen).to(dev),
    )

    def loss(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Tensor, Any]:
        out, s = tr.functional_call(net, p, s, (x,))
        return nn.functional.cross_entropy(out, y), s

    def step(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Any, ...]:
        grads, (value, s) = torch.func.grad_and_value(loss, has_aux=True)(p, s)
        return {k: p[k] - 0.2 * grads[k] for k in p}, s, value

    torch._dynamo.reset()
    try:
        graphs = _unique_graphs()
        compiled, counter = _compile(step, backend, mode)
        current = (params, state)
        losses = []
        with patch.object(torch._dynamo.config, "error_on_recompile", True):
            for _ in range(5):
                want = step(*current)
                torch.compiler.cudagraph_mark_step_begin()
                got = compiled(*current)
                _close(got, want, atol=1e-5, rtol=1e-4)
                current = got[:2]
                losses.append(float(got[2]))
        _assert_one_graph(counter, graphs)
        assert losses[-1] < losses[0]
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- the two code paths


def _kernel_fn(order: int, u: Tensor) -> Callable[[Tensor], Tensor]:
    def f(w: Tensor) -> Tensor:
        return aon(w, u, order=order, n_power_iterations=1)[0]

    return f


@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_compiled_code_path_equals_the_eager_one(order: int) -> None:
    """The Functions compiled code runs (no ``jvp``), run in eager, == the eager path, to rounding."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(6, 10, generator=gen, dtype=F64)
    u = torch.nn.functional.normalize(torch.randn(6, generator=gen, dtype=F64), dim=0)
    c = torch.randn(6, 10, generator=gen, dtype=F64)
    d = torch.randn(6, 10, generator=gen, dtype=F64)
    f = _kernel_fn(order, u)

    def measures() -> tuple[Tensor, ...]:
        def loss(w: Tensor) -> Tensor:
            return (f(w) * c).sum()

        g = torch.func.grad(loss)(w)
        # grad-of-grad: the Hessian-vector product by double backward
        wr = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(loss(wr), wr, create_graph=True)
        (hvp,) = torch.autograd.grad((gw * d).sum(), wr)
        batched = torch.func.vmap(f)(torch.stack([w, 2 * w.flip(1)]))
        return f(w), g, hvp, batched

    eager = measures()
    with patch.object(torch.compiler, "is_compiling", lambda: True):
        compiled_path = measures()
        # and forward mode is what the compiled path cannot do (hence two paths)
        with pytest.raises(RuntimeError, match="jvp"):
            torch.func.jvp(f, (w,), (d,))
    for a, b in zip(compiled_path, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # eager forward mode agrees with reverse mode
    _, jvp = torch.func.jvp(f, (w,), (d,))
    torch.testing.assert_close(
        jvp, torch.func.jacrev(f)(w).flatten(2) @ d.flatten(), atol=1e-12, rtol=1e-10
    )


def test_bf16_products_under_autocast_compile_once() -> None:
    """``matmul_dtype=torch.bfloat16`` inside ``torch.autocast``: one graph, == eager."""
    params = _params(torch.device("cpu"))
    tr = AON(order=2, matmul_dtype=torch.bfloat16)
    state = tr.init(params, generator=torch.Generator().manual_seed(9))

    def f(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Any, Any]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tr.apply(p, s)

    torch._dynamo.reset()
    try:
        graphs = _unique_graphs()
        compiled, counter = _compile(f, "aot_eager", None)

        def inputs(i: int) -> tuple[Any, ...]:
            return {n: p * (1 + i) for n, p in params.items()}, state

        _run_steps(f, compiled, inputs, 3, atol=1e-5, rtol=1e-4)
        _assert_one_graph(counter, graphs)
    finally:
        torch._dynamo.reset()


def test_a_step_whose_plan_reorders_the_matrices_compiles_once() -> None:
    """Three layers that the plan runs in another order than init lists them: no recompile."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    tr = AON.for_module(net, order=2)
    params = {k: v.detach() for k, v in net.named_parameters()}
    state = tr.init(params, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)

    def step(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Any, Any]:
        def loss(p: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            out, new = tr.functional_call(net, p, s, (x,))
            return out.square().sum(), new

        g, new = torch.func.grad(loss, has_aux=True)(p)
        return {k: p[k] - 0.1 * g[k] for k in p}, new

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        p, s = params, state
        for _ in range(3):
            p_ref, s_ref = step(p, s)
            p, s = compiled(p, s)
            _close(p, p_ref, atol=1e-5, rtol=1e-4)
            _close(s, s_ref, atol=1e-5, rtol=1e-4)

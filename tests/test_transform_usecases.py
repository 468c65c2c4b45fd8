"""The use cases of the functional API, on four small models.

Functional training (``torch.func.grad_and_value`` through ``apply``) and the
same with ``torch.optim``; MAML (grad of grad, against finite differences);
ensembles (``vmap`` over stacked models); ``torch.compile(fullgraph=True)`` of
a whole training step. Models: an MLP, a CNN with BatchNorm (buffers), a
ConvTranspose model and a transformer encoder block.

BatchNorm in training mode updates its running statistics in place. Inside
``torch.func`` transforms it may only update tensors made inside the
transformed function, so each loss below clones the buffers it is given and
returns the updated clones (see docs/usage.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aon_func
from aon_func import AON

Tensors = dict[str, Tensor]


class _MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)))


class _EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


# Smooth activations throughout: with ReLU, a pre-activation that rounds to
# either side of 0 (eager vs compiled, or 1 vs 2 threads) flips a gradient
# entry, and a single step can then differ by 1e-3 with nothing wrong.
def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        _MeanPool(),
        nn.Linear(4, 3),
    )


def _convtranspose() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3),
        nn.SiLU(),
        nn.ConvTranspose2d(4, 4, 3, stride=2),
        nn.SiLU(),
        _MeanPool(),
        nn.Linear(4, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (6,)),
    "cnn_batchnorm": (_cnn, (2, 5, 5)),
    "convtranspose": (_convtranspose, (2, 4, 4)),
    "transformer": (_EncoderClassifier, (4, 8)),
}


def _setup(kind: str, device: torch.device, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    make, shape = MODELS[kind]
    torch.manual_seed(seed)
    net = make().to(device)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(6, *shape, generator=g).to(device)
    y = torch.randint(0, 3, (6,), generator=g).to(device)
    return net, x, y


def _raw(module: nn.Module) -> tuple[Tensors, Tensors]:
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def _loss_fn(aon: AON, module: nn.Module) -> Callable[..., Any]:
    def loss(p: Tensors, b: Tensors, s: Tensors, x: Tensor, y: Tensor) -> Any:
        b = {k: v.clone() for k, v in b.items()}  # BatchNorm updates these in place
        out, s = aon.functional_call(module, {**p, **b}, s, (x,))
        return F.cross_entropy(out, y), (s, b)

    return loss


def _sgd_step(aon: AON, module: nn.Module, lr: float) -> Callable[..., Any]:
    grad_and_value = torch.func.grad_and_value(_loss_fn(aon, module), has_aux=True)

    def step(p: Tensors, b: Tensors, s: Tensors, x: Tensor, y: Tensor) -> Any:
        grads, (loss, (s, b)) = grad_and_value(p, b, s, x, y)
        return {k: p[k] - lr * grads[k] for k in p}, b, s, loss

    return step


def _assert_dicts_close(a: Tensors, b: Tensors, **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def _stack(dicts: list[Tensors]) -> Tensors:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


KINDS = list(MODELS)


# ---------------------------------------------------------------- functional training


@pytest.mark.parametrize("kind", KINDS)
def test_functional_training_matches_torch_optim(kind: str, device: torch.device) -> None:
    net, x, y = _setup(kind, device)
    twin = copy.deepcopy(net)
    aon = AON.for_module(net, order=2)
    params, buffers = _raw(net)
    params = aon.add_gains(params, init=1.5)
    state = aon.init(params, generator=torch.Generator().manual_seed(0))
    lr, steps = 0.2, 8

    # Functional: raw params in, new raw params out.
    step = _sgd_step(aon, net, lr)
    p, b, s, losses = params, buffers, state, []
    for _ in range(steps):
        p, b, s, loss = step(p, b, s, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    _assert_dicts_close(dict(net.named_buffers()), buffers, rtol=0, atol=0)  # module untouched

    # torch.optim on the twin module's own nn.Parameters, plus leaf gain tensors.
    opt_params = aon.add_gains(dict(twin.named_parameters()), init=1.5)
    optimizer = torch.optim.SGD(list(opt_params.values()), lr=lr)
    s2 = state
    for _ in range(steps):
        optimizer.zero_grad()
        out, s2 = aon.functional_call(twin, opt_params, s2, x)
        F.cross_entropy(out, y).backward()
        optimizer.step()
    _assert_dicts_close({k: v.detach() for k, v in opt_params.items()}, p, rtol=1e-5, atol=1e-6)
    _assert_dicts_close(s2, s, rtol=1e-5, atol=1e-6)
    _assert_dicts_close(dict(twin.named_buffers()), b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MAML


def _maml_setup(device: torch.device) -> tuple[nn.Module, AON, Tensors, Tensors, list[Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().to(device)
    aon = AON.for_module(net, order=2)
    params = aon.add_gains(_raw(net)[0], init=1.2)
    state = aon.init(params, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(5, d, generator=g, dtype=torch.float64).to(device) for d in (3, 2, 3, 2)]
    return net, aon, params, state, data


def _frozen_aon(z: Tensor, u: Tensor, v: Tensor, order: int) -> Tensor:
    """AON of a wide matrix by the definition in the spec, with ``u`` and ``v`` given constants."""
    sigma = u @ z @ v
    zb = z / sigma
    eye = torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    e = eye - zb @ zb.mT
    c = [1.0]
    for j in range(1, order + 1):
        c.append(c[-1] * (2 * j - 1) / (2 * j))
    p = c[order] * eye
    for j in range(order - 1, -1, -1):
        p = c[j] * eye + e @ p
    what = p @ zb
    return what / (u @ what @ v)


def test_maml_outer_gradient_matches_finite_differences(device: torch.device) -> None:
    """Three inner SGD steps by ``torch.func.grad``; the outer gradient through them.

    Autograd treats the power-iteration vectors ``u`` and ``v`` as constants
    (as spectral normalisation does), so the outer gradient is the exact
    derivative of the function in which each step's ``u`` and ``v`` are held
    at their values. Finite differences of the full function would also see
    ``u`` and ``v`` move with the weights (a second-order effect that grad of
    grad leaves out by design), so they are taken on a reference written from
    the definition, with each step's ``u`` and ``v`` frozen; the reference is
    first checked to compute the same outer loss as the library.
    """
    net, aon, params, state, (xs, ys, xq, yq) = _maml_setup(device)
    names = sorted(state)
    lr, steps = 0.3, 3

    def task_loss(p: Tensors, x: Tensor, y: Tensor) -> Tensor:
        # training=False: every step starts its power iteration from the same state
        out, _ = aon.functional_call(net, p, state, x, training=False)
        return F.mse_loss(out, y)

    def outer_loss(p: Tensors) -> Tensor:
        for _ in range(steps):
            grads = torch.func.grad(task_loss)(p, xs, ys)
            p = {k: p[k] - lr * grads[k] for k in p}
        return task_loss(p, xq, yq)

    def oriented(w: Tensor) -> tuple[Tensor, bool]:
        tall = w.shape[0] > w.shape[1]
        return (w.mT if tall else w), tall

    def uv_of(p: Tensors) -> dict[str, tuple[Tensor, Tensor]]:
        # what the kernel's Gram iterations (at least SAFEGUARD_ITERATIONS) do from the state
        out = {}
        for n in names:
            z, _ = oriented(p[n].detach())
            u = state[n]
            for _ in range(aon_func.SAFEGUARD_ITERATIONS):
                u = F.normalize(z @ z.mT @ u, dim=0)
            out[n] = (u, F.normalize(z.mT @ u, dim=0))
        return out

    def ref_task_loss(p: Tensors, uv: dict, x: Tensor, y: Tensor) -> Tensor:
        weights = {k: v for k, v in p.items() if ":" not in k}
        for n in names:
            z, tall = oriented(p[n])
            h = _frozen_aon(z, *uv[n], order=aon.order) * p[n + ":gain"]
            weights[n] = h.mT if tall else h
        return F.mse_loss(torch.func.functional_call(net, weights, (x,)), y)

    def ref_outer_loss(p: Tensors, frozen: list[dict] | None = None) -> tuple[Tensor, list]:
        uvs = []
        for i in range(steps):
            uv = frozen[i] if frozen else uv_of(p)
            grads = torch.func.grad(ref_task_loss)(p, uv, xs, ys)
            p = {k: p[k] - lr * grads[k] for k in p}
            uvs.append(uv)
        uv = frozen[steps] if frozen else uv_of(p)
        return ref_task_loss(p, uv, xq, yq), [*uvs, uv]

    outer_grad = torch.func.grad(outer_loss)(params)
    value, frozen = ref_outer_loss(params)
    torch.testing.assert_close(value, outer_loss(params), rtol=1e-12, atol=1e-12)
    h = 1e-6
    for name, tensor in params.items():
        fd = torch.zeros_like(tensor).reshape(-1)
        for i in range(tensor.numel()):
            step = torch.zeros_like(tensor).reshape(-1)
            step[i] = h
            step = step.reshape(tensor.shape)
            up, _ = ref_outer_loss({**params, name: tensor + step}, frozen)
            down, _ = ref_outer_loss({**params, name: tensor - step}, frozen)
            fd[i] = (up - down) / (2 * h)
        torch.testing.assert_close(
            outer_grad[name], fd.reshape(tensor.shape), rtol=1e-6, atol=1e-8, msg=name
        )


def test_maml_threading_the_state(device: torch.device) -> None:
    net, aon, params, state, (xs, ys, xq, yq) = _maml_setup(device)

    def task_loss(p: Tensors, s: Tensors, x: Tensor, y: Tensor) -> tuple[Tensor, Tensors]:
        out, s = aon.functional_call(net, p, s, x)
        return F.mse_loss(out, y), s

    def outer_loss(p: Tensors, s: Tensors) -> tuple[Tensor, Tensors]:
        for _ in range(3):
            grads, s = torch.func.grad(task_loss, has_aux=True)(p, s, xs, ys)
            p = {k: p[k] - 0.3 * grads[k] for k in p}
        return task_loss(p, s, xq, yq)

    outer_grad, new_state = torch.func.grad(outer_loss, has_aux=True)(params, state)
    assert outer_grad.keys() == params.keys()
    assert all(torch.isfinite(g).all() for g in outer_grad.values())
    assert new_state.keys() == state.keys()
    # the same gradient by torch.autograd (create_graph) instead of torch.func
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    p, s = dict(leaves), state
    for _ in range(3):
        loss, s = task_loss(p, s, xs, ys)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: p[k] - 0.3 * g for k, g in zip(p, grads, strict=True)}
    loss, s = task_loss(p, s, xq, yq)
    loss.backward()
    _assert_dicts_close({k: v.grad for k, v in leaves.items()}, outer_grad)  # type: ignore[misc]
    _assert_dicts_close(s, new_state)


# ---------------------------------------------------------------- ensembles


@pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented"
)
@pytest.mark.parametrize("kind", KINDS)
def test_ensemble_vmap_equals_separate_models(kind: str, device: torch.device) -> None:
    n = 3
    models, x, y = [], None, None
    for i in range(n):
        net, x, y = _setup(kind, device, seed=i)
        models.append(net)
    assert x is not None
    assert y is not None
    aon = AON.for_module(models[0], order=2)
    # init per model (a generator cannot be used under vmap), then stack
    per_params = [aon.add_gains(_raw(m)[0], init=1.0 + i) for i, m in enumerate(models)]
    per_buffers = [_raw(m)[1] for m in models]
    per_state = [
        aon.init(p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(per_params)
    ]
    params, buffers, state = _stack(per_params), _stack(per_buffers), _stack(per_state)
    # torch.func.stack_module_state stacks the same tensors
    sp, sb = torch.func.stack_module_state(models)  # type: ignore[arg-type]
    _assert_dicts_close({k: v for k, v in params.items() if k in sp}, sp, rtol=0, atol=0)
    _assert_dicts_close(buffers, sb, rtol=0, atol=0)

    weights, new_state = torch.func.vmap(aon.apply)(params, state)
    for i in range(n):
        w_i, s_i = aon.apply(per_params[i], per_state[i])
        _assert_dicts_close({k: v[i] for k, v in weights.items()}, w_i, rtol=1e-5, atol=1e-6)
        _assert_dicts_close({k: v[i] for k, v in new_state.items()}, s_i, rtol=1e-5, atol=1e-6)

    # a whole training step, vmapped, on a stateless copy of the module
    base = copy.deepcopy(models[0]).to("meta")
    step = torch.func.vmap(_sgd_step(aon, base, 0.1), in_dims=(0, 0, 0, None, None))
    p1, b1, s1, loss = step(params, buffers, state, x, y)
    for i in range(n):
        p_i, b_i, s_i, loss_i = _sgd_step(aon, models[i], 0.1)(
            per_params[i], per_buffers[i], per_state[i], x, y
        )
        torch.testing.assert_close(loss[i], loss_i, rtol=1e-5, atol=1e-6)
        for got, want in ((p1, p_i), (b1, b_i), (s1, s_i)):
            # Batched and single convolutions round differently (cuDNN picks other
            # algorithms): BatchNorm's running mean differed by 1.4e-5 on an H200.
            _assert_dicts_close({k: v[i] for k, v in got.items()}, want, rtol=1e-4, atol=5e-5)


# ---------------------------------------------------------------- torch.compile


# Inductor compiles each model's step from scratch in 20 s (idle 2-core CPU) to
# 80 s (busy one), so one model, the richest (convolutions, BatchNorm buffers,
# gains), goes through the default backend, and the others through
# "aot_eager": the same Dynamo capture (fullgraph, recompilation guards) and
# AOTAutograd trace, without Inductor's code generation. docs/usage.md
# compiles the MLP step with the default backend.
COMPILE_BACKENDS = {
    "mlp": "aot_eager",
    "cnn_batchnorm": "inductor",
    "convtranspose": "aot_eager",
    "transformer": "aot_eager",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step(kind: str, device: torch.device) -> None:
    net, x, y = _setup(kind, device)
    aon = AON.for_module(net, order=2)
    params, buffers = _raw(net)
    params = aon.add_gains(params, init=1.5)
    state = aon.init(params, generator=torch.Generator().manual_seed(0))
    step = _sgd_step(aon, net, 0.1)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKENDS[kind])
    # Each compiled step is checked against the eager step from the same
    # input (the compiled trajectory's): comparing two 20-step trajectories
    # instead would compare round-off amplified by the ReLU kinks it crosses.
    current = (params, buffers, state)
    with patch.object(torch._dynamo.config, "error_on_recompile", True):
        for _ in range(20):
            *expected, loss_e = step(*current, x, y)
            *current, loss_c = compiled(*current, x, y)  # type: ignore[assignment]
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            for got, want in zip(current, expected, strict=True):
                _assert_dicts_close(got, want, rtol=1e-4, atol=1e-5)
    assert loss_c < 0.9 * _sgd_step(aon, net, 0.0)(params, buffers, state, x, y)[-1]

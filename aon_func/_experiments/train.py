"""Functional training of one (method, seed) run, checkpointed every epoch.

Training is pure ``torch.func``: the raw parameters (and learnable gains) are a
dict of tensors, the method's transform maps them to the layer weights
(``WeightTransform.apply``), ``torch.func.functional_call`` runs the model and
``torch.func.grad_and_value`` differentiates the loss. The optimiser is Adam
written out on the params dict (the update of ``torch.optim.Adam`` with its
default betas and eps, no weight decay), so its state is a dict of tensors
like everything else in the checkpoint.

Fairness: for a given seed every method starts from the same raw weights
(the model is built under ``torch.manual_seed(seed)`` in a forked RNG), sees
the batches in the same order (a generator seeded by ``seed``) and uses the
same optimiser and learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import WeightTransform, orthogonality_error, soft_orthogonality_penalty, srip_penalty
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import Dataset
from .methods import Method, Scale, make_transform, parse_method, selected_layers
from .models import build_model

__all__ = ["ResumeError", "RunConfig", "adam_init", "adam_update", "probe_layer", "train_run"]

Params = dict[str, Tensor]


class ResumeError(Exception):
    """A checkpoint that does not belong to the requested run; one line for the user."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run (checked against a checkpoint on ``--resume``)."""

    dataset: str
    model: str
    method: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    normalise_head: bool
    gain: str
    gain_init: float

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must match to be resumed (all but ``epochs``)."""
        d = dataclasses.asdict(self)
        del d["epochs"]
        return d


# --------------------------------------------------------------------------- Adam


def adam_init(params: Params) -> dict[str, Any]:
    """Adam's state: step count and first/second moments (zeros) per parameter."""
    return {
        "step": 0,
        "m": {k: torch.zeros_like(v) for k, v in params.items()},
        "v": {k: torch.zeros_like(v) for k, v in params.items()},
    }


def adam_update(
    params: Params,
    grads: Params,
    state: dict[str, Any],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, dict[str, Any]]:
    """One Adam step (``torch.optim.Adam``'s update, no weight decay). Pure."""
    b1, b2 = betas
    step = int(state["step"]) + 1
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    new_p: Params = {}
    new_m: Params = {}
    new_v: Params = {}
    for k, p in params.items():
        g = grads[k]
        m = state["m"][k] * b1 + g * (1 - b1)
        v = state["v"][k] * b2 + g * g * (1 - b2)
        new_p[k] = p - lr * (m / bc1) / ((v / bc2).sqrt() + eps)
        new_m[k], new_v[k] = m, v
    return new_p, {"step": step, "m": new_m, "v": new_v}


# --------------------------------------------------------------------------- helpers


def probe_layer(model: nn.Module) -> str:
    """The layer whose singular values the report plots: a hidden layer of the model."""
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim >= 2]
    hidden = [n for n in names if n != "head.weight"]
    return hidden[len(hidden) // 2] if hidden else names[-1]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class _Run:
    """The pieces of one run: model, method, transform and the pure step."""

    def __init__(self, cfg: RunConfig, data: Dataset, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.method: Method = parse_method(cfg.method)
        self.scale = Scale(cfg.normalise_head, cfg.gain, cfg.gain_init)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = build_model(cfg.model, data.input_shape, data.n_classes)
        self.model.to(device)
        self.layers = selected_layers(self.model, self.scale)
        self.probe = probe_layer(self.model)
        self.transform: WeightTransform | None = make_transform(self.method, self.model, self.scale)
        self.buffers = dict(self.model.named_buffers())

    def initial_params(self) -> Params:
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        if self.transform is not None and self.cfg.gain == "learnable":
            params = self.transform.add_gains(params, init=self.cfg.gain_init)
        return params

    def initial_states(self, params: Params) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        tstate: dict[str, Tensor] = {}
        if self.transform is not None:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            cpu = {k: v.cpu() for k, v in params.items()}
            tstate = {
                k: v.to(self.device) for k, v in self.transform.init(cpu, generator=gen).items()
            }
        pstate: dict[str, Tensor] = {}
        if self.method.family == "srip":
            for name, axis in self.layers.items():
                pstate[name] = srip_penalty(params[name], out_axis=axis)[1]
        return tstate, pstate

    def weights(
        self, params: Params, tstate: dict[str, Tensor], training: bool
    ) -> tuple[Params, dict[str, Tensor]]:
        if self.transform is None:
            return params, tstate
        return self.transform.apply(params, tstate, training=training)

    def forward(self, weights: Params, x: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(self.model, {**self.buffers, **weights}, (x,))
        return out

    def loss(
        self,
        params: Params,
        tstate: dict[str, Tensor],
        pstate: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        weights, tstate = self.weights(params, tstate, True)
        ce = F.cross_entropy(self.forward(weights, x), y)
        total = ce
        if self.method.family == "soft":
            pen = sum(
                (
                    soft_orthogonality_penalty(weights[n], out_axis=a)
                    for n, a in self.layers.items()
                ),
                torch.zeros((), device=x.device),
            )
            total = ce + self.method.lam * pen
        elif self.method.family == "srip":
            new_p: dict[str, Tensor] = {}
            pen = torch.zeros((), device=x.device)
            for n, a in self.layers.items():
                p, new_p[n] = srip_penalty(weights[n], pstate[n], out_axis=a)
                pen = pen + p
            pstate = new_p
            total = ce + self.method.lam * pen
        return total, (ce.detach(), tstate, pstate)

    @torch.no_grad()
    def evaluate(
        self, params: Params, tstate: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[float, float]:
        """``(accuracy, mean cross-entropy)`` on ``(x, y)`` in eval mode (state not advanced)."""
        weights, _ = self.weights(params, tstate, False)
        correct, loss = 0, 0.0
        for i in range(0, x.shape[0], 1000):
            logits = self.forward(weights, x[i : i + 1000].to(self.device))
            yb = y[i : i + 1000].to(self.device)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        return correct / x.shape[0], loss / x.shape[0]

    @torch.no_grad()
    def final_measures(
        self, params: Params, tstate: dict[str, Tensor]
    ) -> tuple[float, dict[str, float], list[float]]:
        """Orthogonality error of the selected layers (gain left out) and the probe's spectrum."""
        bare = {k: v for k, v in params.items() if not k.endswith(":gain")}
        if self.transform is not None:
            t = dataclasses.replace(self.transform, gain=None)
            weights, _ = t.apply(bare, tstate, training=False)
        else:
            weights = bare
        errors = {
            n: float(orthogonality_error(weights[n], out_axis=a)) for n, a in self.layers.items()
        }
        w = weights[self.probe]
        z = w.reshape(w.shape[0], -1)
        spectrum = [float(s) for s in torch.linalg.svdvals(z.cpu().double())]
        return sum(errors.values()) / len(errors), errors, spectrum


def train_run(
    cfg: RunConfig,
    data: Dataset,
    ckpt_path: Path,
    *,
    device: torch.device,
    resume: bool,
    progress: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one run to ``cfg.epochs``, checkpointing after every epoch.

    With ``resume`` and an existing checkpoint, training continues from it and
    ends with the same numbers as an uninterrupted run (bitwise on the CPU).
    Returns the run's result: final metrics, per-epoch history, spectrum.
    """
    run = _Run(cfg, data, device)
    params = {k: v.to(device) for k, v in run.initial_params().items()}
    tstate, pstate = run.initial_states(params)
    opt = adam_init(params)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = 0
    if resume and ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path, device)
        except Exception as exc:
            raise ResumeError(f"cannot resume from {ckpt_path}: {exc}".splitlines()[0]) from exc
        stored = ckpt["config"]
        if {k: stored.get(k) for k in cfg.identity()} != cfg.identity():
            diff = sorted(k for k, v in cfg.identity().items() if stored.get(k) != v)
            raise ResumeError(
                f"{ckpt_path} belongs to another run (differs in {', '.join(diff)}); "
                "use the options it was started with, or another --out"
            )
        if ckpt["epoch"] > cfg.epochs:
            raise ResumeError(
                f"{ckpt_path} has already trained {ckpt['epoch']} epochs > --epochs {cfg.epochs}"
            )
        if ckpt["epoch"] == cfg.epochs and "result" in ckpt:
            result: dict[str, Any] = ckpt["result"]
            return result
        params, tstate, pstate = ckpt["params"], ckpt["transform_state"], ckpt["penalty_state"]
        opt = ckpt["adam"]
        data_gen.set_state(ckpt["data_rng"].cpu())
        restore_rng(ckpt["rng"])
        history = ckpt["history"]
        start = int(ckpt["epoch"])

    x_tr = data.x_train.to(device)
    y_tr = data.y_train.to(device)
    step = torch.func.grad_and_value(run.loss, has_aux=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.epochs,
            initial=start,
            desc=f"{cfg.method} seed {cfg.seed}",
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )
        if history:
            bar.set_postfix(
                loss=f"{history[-1]['train_loss']:.3f}", acc=f"{history[-1]['test_acc']:.3f}"
            )
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            total, count = torch.zeros((), device=device), 0
            for idx in _batches(x_tr.shape[0], cfg.batch_size, data_gen):
                idx = idx.to(device)
                xb, yb = x_tr[idx], y_tr[idx]
                grads, (_, (ce, tstate, pstate)) = step(params, tstate, pstate, xb, yb)
                params, opt = adam_update(params, grads, opt, cfg.lr)
                total = total + ce * idx.shape[0]
                count += idx.shape[0]
            train_loss = float(total) / count
            seconds = time.perf_counter() - t0
            test_acc, test_loss = run.evaluate(params, tstate, data.x_test, data.y_test)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "test_acc": test_acc,
                    "test_loss": test_loss,
                    "seconds": seconds,
                }
            )
            payload: dict[str, Any] = {
                "config": dataclasses.asdict(cfg),
                "epoch": epoch + 1,
                "params": params,
                "transform_state": tstate,
                "penalty_state": pstate,
                "adam": opt,
                "data_rng": data_gen.get_state(),
                "rng": capture_rng(),
                "history": history,
            }
            if epoch + 1 == cfg.epochs:
                payload["result"] = _result(run, cfg, params, tstate, history)
            save_checkpoint(ckpt_path, payload)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{test_acc:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1)
    finally:
        if bar is not None:
            bar.close()
    if start == cfg.epochs:  # a checkpoint of the last epoch without its result
        return _result(run, cfg, params, tstate, history)
    final: dict[str, Any] = load_checkpoint(ckpt_path)["result"]
    return final


def _result(
    run: _Run,
    cfg: RunConfig,
    params: Params,
    tstate: dict[str, Tensor],
    history: list[dict[str, float]],
) -> dict[str, Any]:
    ortho, per_layer, spectrum = run.final_measures(params, tstate)
    secs = sorted(h["seconds"] for h in history)
    gains = {k[: -len(":gain")]: float(v) for k, v in params.items() if k.endswith(":gain")}
    return {
        "method": cfg.method,
        "label": run.method.label,
        "seed": cfg.seed,
        "test_acc": history[-1]["test_acc"],
        "train_loss": history[-1]["train_loss"],
        "test_loss": history[-1]["test_loss"],
        "ortho_error": ortho,
        "ortho_error_per_layer": per_layer,
        "sec_per_epoch": secs[len(secs) // 2] if secs else math.nan,
        "probe_layer": run.probe,
        "spectrum": spectrum,
        "gains": gains,
        "history": history,
    }

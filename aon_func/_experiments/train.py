"""Functional training of one (method, seed) run, checkpointed every epoch.

Training is pure ``torch.func``: the raw parameters (and learnable gains) are a
dict of tensors, the method's transform maps them to the layer weights
(``WeightTransform.apply``), ``torch.func.functional_call`` runs the model and
``torch.func.grad_and_value`` differentiates the loss. The optimiser is
``torch.optim.Adam(foreach=True)`` (default betas and eps, no weight decay;
``torch.optim.AdamW`` for the ``wd`` control), given those gradients
(:class:`Adam`); its ``state_dict`` goes into the checkpoint, so
``--resume`` continues it exactly.

Protocol: the run trains on its seed's training split
(:func:`data.split_validation`); every per-epoch number (the history) is
measured on the validation split; the test set is read once, after the last
epoch (for ``es``, on the parameters of the best validation epoch).

Fairness: for a given seed every method starts from the same raw weights
(the model is built under ``torch.manual_seed(seed)`` in a forked RNG), sees
the same split and the batches in the same order (a generator seeded by
``seed``) and uses the same optimiser and learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import (
    GAIN_SUFFIX,
    orthogonality_error,
    soft_orthogonality_penalty,
    srip_penalty,
)
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import Dataset, Split, split_validation
from .methods import (
    Method,
    Scale,
    Transform,
    make_transform,
    parse_method,
    selected_layers,
    without_gain,
)
from .models import DEEP_MODELS, HEAD_WEIGHT, build_model

__all__ = ["Adam", "EpochCallback", "ResumeError", "RunConfig", "probe_layer", "train_run"]

Params = dict[str, Tensor]

EpochCallback = Callable[[int, dict[str, Any]], None]
"""``on_epoch(epoch, record)``: called with the number of epochs done and that epoch's
record of the history (``train_loss``, ``val_acc``, ...)."""


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
    val_fraction: float = 0.1
    train_size: int = 0
    """The size of the training subset before the validation split (0: all)."""
    depth: int = 0
    width: int = 0
    activation: str = ""
    """``depth``, ``width`` and ``activation``: the deep models' options (unused otherwise)."""

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must match to be resumed (all but ``epochs``)."""
        d = dataclasses.asdict(self)
        del d["epochs"]
        return d


# --------------------------------------------------------------------------- Adam


class Adam:
    """``torch.optim.Adam(foreach=True)`` on a dict of parameters, fed gradients by ``torch.func``.

    With ``weight_decay > 0`` it is ``torch.optim.AdamW`` (decoupled decay, on
    every parameter).

    :meth:`step` updates the tensors of ``params`` in place (they are the
    optimiser's parameters). The state is the optimiser's own ``state_dict``
    plus the parameter names in its order, which :meth:`load_state_dict`
    checks, so a checkpoint resumes the optimiser exactly.
    """

    def __init__(self, params: Params, lr: float, *, weight_decay: float = 0.0) -> None:
        self.params = params
        self.optimizer: torch.optim.Optimizer
        if weight_decay > 0:
            self.optimizer = torch.optim.AdamW(
                list(params.values()), lr=lr, weight_decay=weight_decay, foreach=True
            )
        else:
            self.optimizer = torch.optim.Adam(list(params.values()), lr=lr, foreach=True)

    def step(self, grads: Params) -> None:
        """One Adam step with ``grads`` (same keys as ``params``)."""
        for name, p in self.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """``{"names": [...], "torch": torch.optim.Adam.state_dict()}``."""
        return {"names": list(self.params), "torch": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; ``ValueError`` if the parameter names differ."""
        if list(state["names"]) != list(self.params):
            raise ValueError(
                f"optimiser state for parameters {state['names']}, expected {list(self.params)}"
            )
        self.optimizer.load_state_dict(state["torch"])


# --------------------------------------------------------------------------- helpers


def probe_layer(model: nn.Module) -> str:
    """The layer whose singular values the report plots: a hidden layer of the model."""
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim >= 2]
    hidden = [n for n in names if n != HEAD_WEIGHT]
    return hidden[len(hidden) // 2] if hidden else names[-1]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class _Run:
    """The pieces of one run: model, method, transform and the pure step."""

    def __init__(self, cfg: RunConfig, data: Split, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.method: Method = parse_method(cfg.method)
        self.scale = Scale(cfg.normalise_head, cfg.gain, cfg.gain_init)
        deep = (
            {"depth": cfg.depth, "width": cfg.width or None, "activation": cfg.activation}
            if cfg.model in DEEP_MODELS
            else {}
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = build_model(cfg.model, data.input_shape, data.n_classes, **deep)  # type: ignore[arg-type]
        self.model.to(device)
        self.layers = selected_layers(self.model, self.scale)
        self.probe = probe_layer(self.model)
        self.transform: Transform | None = make_transform(self.method, self.model, self.scale)
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
        bare = {k: v for k, v in params.items() if not k.endswith(GAIN_SUFFIX)}
        if self.transform is not None:
            t = without_gain(self.transform)
            weights, _ = t.apply(bare, tstate, training=False)
        else:
            weights = bare
        errors = {
            n: float(orthogonality_error(weights[n], out_axis=a)) for n, a in self.layers.items()
        }
        w = weights[self.probe]
        z = w.reshape(w.shape[0], -1).cpu().double()
        finite = bool(torch.isfinite(z).all())  # a diverged run: NaN, not an SVD error
        spectrum = [float(s) for s in torch.linalg.svdvals(z)] if finite else [math.nan]
        return sum(errors.values()) / len(errors), errors, spectrum

    @torch.no_grad()
    def condition_numbers(
        self, params: Params, tstate: dict[str, Tensor]
    ) -> dict[str, float | None]:
        """The condition number (largest / smallest singular value, short side) of each
        selected layer's weight as the model uses it (``None`` for a singular one, or one
        with non-finite entries: a diverged run is reported, not stopped)."""
        weights, _ = self.weights(params, tstate, False)
        out: dict[str, float | None] = {}
        for n, a in self.layers.items():
            w = weights[n].movedim(a, 0).reshape(weights[n].shape[a], -1).cpu().double()
            if not bool(torch.isfinite(w).all()):
                out[n] = None
                continue
            s = torch.linalg.svdvals(w)
            out[n] = float(s[0] / s[-1]) if float(s[-1]) > 0 else None
        return out


def _config_of(cfg: RunConfig) -> dict[str, Any]:
    """The tunable part of a run's configuration (what ``methods[...]["selected"]`` holds)."""
    return {
        "method": cfg.method,
        "lr": cfg.lr,
        "normalise_head": cfg.normalise_head,
        "gain": cfg.gain,
        "gain_init": cfg.gain_init,
    }


def train_run(
    cfg: RunConfig,
    data: Dataset,
    ckpt_path: Path,
    *,
    device: torch.device,
    resume: bool,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train one run to ``cfg.epochs``, checkpointing after every epoch.

    ``data`` is the whole data set (subsampled already); the run carves its
    seed's validation split from the training set itself.

    With ``resume`` and an existing checkpoint, training continues from it and
    ends with the same numbers as an uninterrupted run (bitwise on the CPU);
    a checkpoint of fewer epochs than ``cfg.epochs`` is trained on to
    ``cfg.epochs`` (the caller decides whether that is allowed). ``on_epoch``
    is called after every epoch, and once at the start with the checkpoint's
    last epoch when a resumed run has trained some already. Returns the
    run's result: final metrics, per-epoch history, spectrum.
    """
    split = split_validation(data, cfg.val_fraction, cfg.seed)
    run = _Run(cfg, split, device)
    params = {k: v.to(device) for k, v in run.initial_params().items()}
    tstate, pstate = run.initial_states(params)
    opt_state: dict[str, Any] | None = None
    data_gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # es: the epoch of the best validation accuracy
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
        history = ckpt["history"]
        start = int(ckpt["epoch"])
        if on_epoch is not None and history:
            on_epoch(start, history[-1])
        if start == cfg.epochs and "result" in ckpt:
            result: dict[str, Any] = ckpt["result"]
            return result
        params, tstate, pstate = ckpt["params"], ckpt["transform_state"], ckpt["penalty_state"]
        opt_state = ckpt["optimizer"]
        best = ckpt.get("best")
        data_gen.set_state(ckpt["data_rng"].cpu())
        restore_rng(ckpt["rng"])

    decay = run.method.lam if run.method.family == "wd" else 0.0
    opt = Adam(params, cfg.lr, weight_decay=decay)
    if opt_state is not None:
        try:
            opt.load_state_dict(opt_state)
        except ValueError as exc:
            raise ResumeError(f"cannot resume from {ckpt_path}: {exc}") from exc
    x_tr = split.x_train.to(device)
    y_tr = split.y_train.to(device)
    layer_names = list(run.layers)
    step = torch.func.grad_and_value(run.loss, has_aux=True)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        total, count, steps = torch.zeros((), device=device), 0, 0
        gnorm = torch.zeros(len(layer_names), device=device)
        for idx in _batches(x_tr.shape[0], cfg.batch_size, data_gen):
            idx = idx.to(device)
            xb, yb = x_tr[idx], y_tr[idx]
            grads, (_, (ce, tstate, pstate)) = step(params, tstate, pstate, xb, yb)
            gnorm = gnorm + torch.stack([torch.linalg.vector_norm(grads[n]) for n in layer_names])
            opt.step(grads)
            total = total + ce * idx.shape[0]
            count += idx.shape[0]
            steps += 1
        train_loss = float(total) / count
        seconds = time.perf_counter() - t0
        val_acc, val_loss = run.evaluate(params, tstate, split.x_val, split.y_val)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "seconds": seconds,
            "grad_norm": dict(zip(layer_names, (gnorm / steps).tolist(), strict=True)),
            "cond": run.condition_numbers(params, tstate),
        }
        history.append(record)
        if run.method.family == "es" and (best is None or val_acc > best["val_acc"]):
            best = {
                "epoch": epoch + 1,
                "val_acc": val_acc,
                "params": {k: v.detach().clone() for k, v in params.items()},
                "transform_state": {k: v.clone() for k, v in tstate.items()},
            }
        payload: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "epoch": epoch + 1,
            "params": params,
            "transform_state": tstate,
            "penalty_state": pstate,
            "optimizer": opt.state_dict(),
            "data_rng": data_gen.get_state(),
            "rng": capture_rng(),
            "history": history,
        }
        if best is not None:
            payload["best"] = best
        if epoch + 1 == cfg.epochs:
            payload["result"] = _result(run, cfg, split, params, tstate, history, best)
        save_checkpoint(ckpt_path, payload)
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
    if start == cfg.epochs:  # a checkpoint of the last epoch without its result
        return _result(run, cfg, split, params, tstate, history, best)
    final: dict[str, Any] = load_checkpoint(ckpt_path)["result"]
    return final


def _result(
    run: _Run,
    cfg: RunConfig,
    split: Split,
    params: Params,
    tstate: dict[str, Tensor],
    history: list[dict[str, Any]],
    best: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's result; the only place the test set is read."""
    stop = history[-1]
    if best is not None:  # early stopping: the model of the best validation epoch
        params, tstate = best["params"], best["transform_state"]
        stop = history[best["epoch"] - 1]
    test_acc, test_loss = run.evaluate(params, tstate, split.x_test, split.y_test)
    ortho, per_layer, spectrum = run.final_measures(params, tstate)
    secs = sorted(h["seconds"] for h in history)
    gains = {k[: -len(GAIN_SUFFIX)]: float(v) for k, v in params.items() if k.endswith(GAIN_SUFFIX)}
    return {
        "method": cfg.method,
        "label": run.method.label,
        "seed": cfg.seed,
        "config": _config_of(cfg),
        "val_acc": stop["val_acc"],
        "test_acc": test_acc,
        "train_loss": stop["train_loss"],
        "test_loss": test_loss,
        "stopped_epoch": stop["epoch"],
        "ortho_error": ortho,
        "ortho_error_per_layer": per_layer,
        "sec_per_epoch": secs[len(secs) // 2] if secs else math.nan,
        "probe_layer": run.probe,
        "spectrum": spectrum,
        "gains": gains,
        "history": history,
    }

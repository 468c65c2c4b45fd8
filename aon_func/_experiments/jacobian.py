"""The singular values of the Jacobians of the trained networks: dynamical isometry.

A network is dynamically isometric when the singular values of its
input-output Jacobian all sit near one value (Saxe et al. 2014, Pennington
et al. 2017): the spread of the spectrum, not its scale, is what deep plain
networks lose. For one network, :func:`jacobian_spectrum` gives every
singular value of one of two Jacobians at each of a few inputs, in float64:

- ``input-output``: the logits with respect to the input,
  ``d f(x) / d x``, a ``classes x prod(input shape)`` matrix per input;
- ``hidden`` (``deep-mlp`` only, at least two hidden layers): the last hidden
  representation with respect to the first, ``d h_{L-1} / d h_1`` with
  ``h_i`` the output of the ``i``-th hidden layer after its activation, the
  ``width x width`` Jacobian of the deep stack between (the input layer and
  the classifier left out), taken at ``h_1 = act(W_1 x + b_1)``.

The network is the one the method uses: the weights after its transform
(AON, ONI, ...: gains applied, state not advanced, eval mode; the raw
weights for ``plain``, the penalties and the controls).

:func:`from_results` applies it to a compare/train folder
(``aon-func jacobian DIR``): for each method's first evaluation run (lowest
seed; all of them with ``all_runs``), the network at initialisation (the
seed's initial parameters and transform state, rebuilt exactly as
``train.train_run`` builds them: the checkpoints do not keep them) and
after training (the checkpoint's parameters and state; for ``es`` its best
validation epoch, the reported model). The inputs are ``n_inputs``
standard normal examples of the data set's shape from a generator seeded
0 (``inputs="normal"``, the same for every method and both times; the
standardised images of mnist and cifar10 have that scale, digits and
MNIST-1D do not), or the first ``n_inputs`` test examples
(``inputs="test"``, which loads the data set; mnist and cifar10 need
``data_dir``). Nothing in the folder is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "INPUTS",
    "JACOBIANS",
    "NEAR_MEDIAN",
    "N_CLASSES",
    "from_results",
    "jacobian_spectrum",
    "markdown",
    "plot",
    "summarise",
]

JACOBIANS = ("input-output", "hidden")
"""The Jacobians :func:`jacobian_spectrum` computes (see the module docstring)."""

INPUTS = ("normal", "test")
"""Where :func:`from_results` takes its inputs from (see the module docstring)."""

N_CLASSES = 10
"""Every data set of the comparison has 10 classes (the command line assumes it too)."""

NEAR_MEDIAN = 2.0
"""``frac_near_median`` counts the singular values within a factor of 2 of the median."""


# --------------------------------------------------------------------------- one network


def _hidden_stack(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(first, stack)`` of a ``DeepMLP``: ``x -> h_1`` and ``h_1 -> h_{L-1}`` (keys kept)."""
    from .._zoo import DeepMLP

    if not isinstance(model, DeepMLP):
        raise ValueError(
            f"the hidden Jacobian is defined for deep-mlp only, not {type(model).__name__}"
        )
    body = model.body
    assert isinstance(body, nn.Sequential)
    if len(body) < 4:
        raise ValueError(
            "one hidden layer (--depth 2): no stack between the first and the last hidden layer"
        )
    return body[:2], body[2:]


def _own(module: nn.Module, weights: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The entries of ``weights`` that are ``module``'s, under ``prefix``, by its own names."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return {n: weights[prefix + n] for n in names if prefix + n in weights}


def summarise(singular_values: Tensor) -> dict[str, Any]:
    """The spread of the spectra ``singular_values`` (``inputs x k``), averaged over the inputs.

    A singular value counts as zero below ``k * eps`` (float64) of its
    input's largest: the directions a ReLU network drops (dead units make
    its hidden Jacobians rank-deficient by construction). ``zero_frac`` is
    their share over all inputs, ``n_zero`` their count; the spread is
    measured on the others. Per input: ``max``, ``min`` and ``median`` of the
    non-zero singular values, ``cond`` (``max / min``), ``mean_log`` (the
    mean of ``log s``) and ``frac_near_median`` (the share of the non-zero
    ones within a factor :data:`NEAR_MEDIAN` of their median). The positive
    scales (``max``, ``min``, ``median``, ``cond``) are averaged geometrically
    over the inputs, ``mean_log`` and ``frac_near_median`` arithmetically; an
    input whose Jacobian is zero makes them ``None``.
    """
    s = singular_values.to(torch.float64)
    eps = torch.finfo(torch.float64).eps * max(s.shape[-1], 1)
    keys = ("max", "min", "median", "cond", "mean_log", "frac_near_median")
    per: dict[str, list[float]] = {k: [] for k in keys}
    n_zero, dead = 0, False
    for row in s:
        top = float(row.max())
        nz = row[row > top * eps] if top > 0 else row[:0]
        n_zero += int(row.numel() - nz.numel())
        if not nz.numel():
            dead = True
            continue
        low, med = float(nz.min()), float(nz.median())
        near = (nz >= med / NEAR_MEDIAN) & (nz <= med * NEAR_MEDIAN)
        for key, v in zip(
            keys,
            (top, low, med, top / low, float(nz.log().mean()), float(near.double().mean())),
            strict=True,
        ):
            per[key].append(v)
    out: dict[str, Any] = {}
    for key, values in per.items():
        if dead or not values:
            out[key] = None
        elif key in ("mean_log", "frac_near_median"):
            out[key] = sum(values) / len(values)
        else:
            out[key] = math.exp(sum(math.log(v) for v in values) / len(values))
    out["n_zero"] = n_zero
    out["zero_frac"] = n_zero / max(s.numel(), 1)
    return out


def jacobian_spectrum(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    jacobian: str = "input-output",
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """The singular values of ``model``'s Jacobian under ``weights`` at each of ``inputs``.

    ``weights`` are the tensors the network uses (after the method's
    transform), by parameter name; the model's own parameters are not read,
    its buffers are. ``inputs`` is a batch of examples. ``jacobian`` is
    ``"input-output"`` (logits w.r.t. the input) or ``"hidden"`` (the deep
    stack of a ``DeepMLP``, last hidden representation w.r.t. the first;
    ``ValueError`` for another model or a single hidden layer). Everything
    runs in ``dtype`` (``torch.func.vmap`` of ``jacrev``), the model in eval
    mode. Returns ``shape`` (of one Jacobian), ``singular_values`` (one
    descending list per input) and :func:`summarise`'s numbers.
    """
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian {jacobian!r}; choose from {', '.join(JACOBIANS)}")
    model.eval()
    full = {
        **{k: v.detach().to(dtype) for k, v in model.named_buffers()},
        **{k: v.detach().to(dtype) for k, v in weights.items()},
    }
    x = inputs.detach().to(dtype)
    net: nn.Module = model
    if jacobian == "hidden":
        first, net = _hidden_stack(model)
        with torch.no_grad():
            x = torch.func.functional_call(
                first, _own(first, full, "body."), (x.flatten(1),), strict=True
            )
        full = _own(net, full, "body.")

    def f(example: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(net, full, (example.unsqueeze(0),), strict=True)
        return out.squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(f))(x)
    jac = jac.reshape(x.shape[0], -1, x[0].numel())
    s = torch.linalg.svdvals(jac)
    return {
        "shape": [int(jac.shape[1]), int(jac.shape[2])],
        "singular_values": s.tolist(),
        **summarise(s),
    }


# --------------------------------------------------------------------------- a results folder


def _run_config(res: dict[str, Any], run: dict[str, Any], ckpt: dict[str, Any] | None) -> Any:
    """The run's ``train.RunConfig``: the checkpoint's, else rebuilt from ``results.json``."""
    from .train import RunConfig

    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        names = {f.name for f in dataclasses.fields(RunConfig)}
        return RunConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    top, own = res["config"], run["config"]
    return RunConfig(
        dataset=top["dataset"],
        model=top["model"],
        method=own["method"],
        seed=int(run["seed"]),
        epochs=int(top["epochs"]),
        batch_size=int(top["batch_size"]),
        lr=float(own["lr"]),
        normalise_head=bool(own["normalise_head"]),
        gain=str(own["gain"]),
        gain_init=float(own["gain_init"]),
        val_fraction=float(top["val_fraction"]),
        train_size=int(top.get("train_size") or 0),
        depth=int(top.get("depth") or 0),
        width=int(top.get("width") or 0),
        activation=str(top.get("activation") or ""),
    )


def _inputs(cfg: Any, how: str, n: int, data_dir: Path | None) -> Tensor:
    from .models import DATASET_SHAPES

    if how == "normal":
        shape = DATASET_SHAPES[cfg.dataset]
        return torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    from .data import load_dataset

    return load_dataset(cfg.dataset, data_dir).x_test[:n].clone()


def _spectra(
    base: dict[str, Any],
    when: str,
    model: nn.Module,
    weights: Mapping[str, Tensor],
    x: Tensor,
    deep_mlp: bool,
) -> list[dict[str, Any]]:
    rows = []
    for which in JACOBIANS:
        row = {**base, "when": when, "jacobian": which}
        if which == "hidden" and not deep_mlp:
            rows.append(
                {**row, "skipped": f"the hidden Jacobian is for deep-mlp only, not {base['model']}"}
            )
            continue
        try:
            rows.append({**row, **jacobian_spectrum(model, weights, x, jacobian=which)})
        except ValueError as exc:
            rows.append({**row, "skipped": str(exc)})
    return rows


def _skipped(base: dict[str, Any], when: str, reason: str, deep_mlp: bool) -> list[dict[str, Any]]:
    return [
        {**base, "when": when, "jacobian": which, "skipped": reason}
        for which in JACOBIANS
        if which == "input-output" or deep_mlp
    ]


def from_results(
    folder: Path,
    *,
    n_inputs: int = 8,
    inputs: str = "normal",
    data_dir: Path | None = None,
    all_runs: bool = False,
) -> list[dict[str, Any]]:
    """The Jacobian spectra of the runs of ``folder/results.json``, one row per
    (method, seed, ``when``, ``jacobian``); JSON-serialisable.

    For each method, its first evaluation run (lowest seed), or every one with
    ``all_runs``, at ``when="init"`` (rebuilt) and ``"trained"`` (its
    checkpoint), each :data:`JACOBIANS` (``hidden`` for ``deep-mlp`` only) at
    the same ``n_inputs`` inputs (``"normal"`` or ``"test"``, see the module
    docstring). A row has ``method``, ``trained_with`` (the concrete method),
    ``label``, ``seed``, ``model``, ``inputs``, ``n_inputs``, ``epoch`` (0 at
    init; the checkpoint's, or ``es``'s best epoch) and
    :func:`jacobian_spectrum`'s numbers, or ``skipped`` with the reason (a
    run without a checkpoint, or one that cannot be rebuilt).
    """
    from .checkpoint import load_checkpoint
    from .data import Split
    from .models import DATASET_SHAPES
    from .train import _Run

    if inputs not in INPUTS:
        raise ValueError(f"inputs {inputs!r}; choose from {', '.join(INPUTS)}")
    if n_inputs < 1:
        raise ValueError(f"n_inputs {n_inputs}: at least 1")
    res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    cpu = torch.device("cpu")
    out: list[dict[str, Any]] = []
    cache: dict[tuple[str, str, int], Tensor] = {}
    for name, m in res["methods"].items():
        runs = sorted(m["runs"], key=lambda r: r["seed"])
        for run in runs if all_runs else runs[:1]:
            concrete = run.get("config", {}).get("method", name)
            base: dict[str, Any] = {
                "method": name,
                "trained_with": concrete,
                "label": run.get("label", m.get("label", name)),
                "seed": int(run["seed"]),
                "model": res["config"].get("model"),
                "inputs": inputs,
                "n_inputs": n_inputs,
            }
            deep_mlp = base["model"] == "deep-mlp"
            ckpt: dict[str, Any] | None = None
            missing: str | None = None
            if "checkpoint" not in run:
                missing = "no checkpoint recorded in results.json"
            elif not (folder / run["checkpoint"]).is_file():
                missing = f"checkpoint {run['checkpoint']} not found"
            else:
                try:
                    ckpt = load_checkpoint(folder / run["checkpoint"])
                except (OSError, ValueError, RuntimeError) as exc:
                    missing = f"checkpoint {run['checkpoint']} unreadable: {exc}".splitlines()[0]
            try:
                cfg = _run_config(res, run, ckpt)
                base["model"] = cfg.model
                deep_mlp = cfg.model == "deep-mlp"
                shape = DATASET_SHAPES[cfg.dataset]
                empty = torch.empty((0, *shape))
                label = torch.empty(0, dtype=torch.long)
                split = Split(empty, label, empty, label, empty, label, N_CLASSES)
                built = _Run(cfg, split, cpu)
                key = (cfg.dataset, inputs, n_inputs)
                if key not in cache:
                    cache[key] = _inputs(cfg, inputs, n_inputs, data_dir)
                x = cache[key]
                params = built.initial_params()
                tstate, _ = built.initial_states(params)
                with torch.no_grad():
                    weights, _ = built.weights(params, tstate, False)
            except (KeyError, TypeError, ValueError) as exc:
                reason = f"cannot rebuild the run: {type(exc).__name__}: {exc}".splitlines()[0]
                out += _skipped({**base, "epoch": 0}, "init", reason, deep_mlp)
                out += _skipped(base, "trained", reason, deep_mlp)
                continue
            out += _spectra({**base, "epoch": 0}, "init", built.model, weights, x, deep_mlp)
            if ckpt is None:
                out += _skipped(base, "trained", missing or "no checkpoint", deep_mlp)
                continue
            state = ckpt.get("best") or ckpt  # es: the reported model, of its best epoch
            epoch = int(state.get("epoch", ckpt.get("epoch", 0)))
            try:
                with torch.no_grad():
                    weights, _ = built.weights(state["params"], state["transform_state"], False)
            except (KeyError, RuntimeError, ValueError) as exc:
                reason = f"checkpoint does not fit the run: {type(exc).__name__}: {exc}"
                out += _skipped(base, "trained", reason.splitlines()[0], deep_mlp)
                continue
            out += _spectra({**base, "epoch": epoch}, "trained", built.model, weights, x, deep_mlp)
    return out


# --------------------------------------------------------------------------- reports


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table: method, seed, when, Jacobian, max, min, median, cond, the share within x2
    of the median, the share of zero singular values (:func:`summarise`); then the skipped
    rows with their reasons."""
    done = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    if not rows:
        return "no run found"
    parts = []
    if done:
        first = done[0]
        what = (
            "standard normal inputs (generator seed 0)"
            if first["inputs"] == "normal"
            else "test examples"
        )
        lines = [
            f"Singular values of the Jacobians at {first['n_inputs']} {what}, averaged "
            "over the inputs (geometric mean); max, min, median, cond = max / min and the "
            "share within ×2 of the median are of the non-zero ones; zero: the share of "
            "zero singular values (dead ReLU units)",
            "",
            "| method | seed | when | Jacobian | max | min | median | cond | within ×2 of median "
            "| zero |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['method']} | {r['seed']} | {r['when']} | {r['jacobian']} {r['shape'][0]}×"
            f"{r['shape'][1]} | {_fmt(r['max'])} | {_fmt(r['min'])} | {_fmt(r['median'])} | "
            f"{_fmt(r['cond'])} | {_pct(r['frac_near_median'])} | {_pct(r['zero_frac'])} |"
            for r in done
        ]
        parts.append("\n".join(lines))
    if skipped:
        parts.append(
            "\n".join(
                f"- {r['method']} seed {r['seed']}, {r['when']}, {r['jacobian']}: skipped "
                f"({r['skipped']})"
                for r in skipped
            )
        )
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """A PNG of the sorted singular values (log scale; geometric mean over the inputs per
    rank, zeros left out), one panel per method: init dashed, trained solid, one colour per
    Jacobian."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r]
    methods = list(dict.fromkeys(r["method"] for r in done))
    n = max(len(methods), 1)
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True
    )
    seeds = {r["seed"] for r in done}
    for i, (ax, method) in enumerate(zip(axes.flat, methods, strict=False)):
        for r in (r for r in done if r["method"] == method):
            s = torch.tensor(r["singular_values"], dtype=torch.float64)
            s = s.sort(dim=1, descending=True).values
            eps = torch.finfo(torch.float64).eps * s.shape[1]
            logs = s.log().masked_fill(s <= s[:, :1] * eps, math.nan)  # zeros left out
            curve = logs.nanmean(0).exp()
            label = f"{r['jacobian']} {r['when']}" + (f" s{r['seed']}" if len(seeds) > 1 else "")
            ax.plot(
                range(1, curve.numel() + 1),
                curve.tolist(),
                linestyle="--" if r["when"] == "init" else "-",
                color="C0" if r["jacobian"] == "input-output" else "C1",
                marker=("o" if r["when"] == "init" else ".") if curve.numel() <= 20 else None,
                fillstyle="none",
                markersize=4,
                label=label,
            )
        ax.set_yscale("log")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("rank", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("singular value", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

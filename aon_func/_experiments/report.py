"""Results: aggregate runs per method, write JSON/CSV/Markdown and the plots, print a table.

The plots (:func:`write_plots`) read only what each run recorded and skip
what is missing or not a finite number (``None``, NaN, inf), so a
``results.json`` of an older version, without the per-layer ``cond`` and
``grad_norm`` of the history, still renders: a panel without data says so.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTS = ("accuracy.png", "spectra.png", "speed_accuracy.png", "training.png", "conditioning.png")
"""The images :func:`write_plots` writes, in the order ``results.md`` shows them."""

_CAPTIONS = (
    "validation accuracy",
    "singular values",
    "time per training step against test accuracy",
    "training loss",
    "condition number and raw-gradient norm per layer",
)

__all__ = [
    "PLOTS",
    "comparison_lines",
    "layer_band",
    "markdown_table",
    "mean_curve",
    "results_markdown",
    "speed_point",
    "steps_per_epoch",
    "summarise",
    "text_table",
    "write_plots",
    "write_results",
]


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method of ``results.json``'s ``methods`` (in order): means over the
    evaluation seeds (sample std and BCa interval for the test accuracy)."""
    rows = []
    for method, m in methods.items():
        rs = m["runs"]
        acc_mean, acc_std = _mean_std([r["test_acc"] for r in rs])
        ci = m.get("test_acc_ci95") or [math.nan, math.nan]
        rows.append(
            {
                "method": method,
                "label": m["label"],
                "seeds": len(rs),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "test_acc_ci95_lo": ci[0],
                "test_acc_ci95_hi": ci[1],
                "val_acc_mean": statistics.fmean(r["val_acc"] for r in rs),
                "train_loss": statistics.fmean(r["train_loss"] for r in rs),
                "ortho_error": statistics.fmean(r["ortho_error"] for r in rs),
                "sec_per_epoch": statistics.fmean(r["sec_per_epoch"] for r in rs),
                "selected": _describe_selected(m["selected"]),
            }
        )
    return rows


def _describe_selected(sel: dict[str, Any]) -> str:
    head = "head normalised" if sel["normalise_head"] else "free head"
    return f"{sel['method']}, lr {sel['lr']:g}, {head}, gain {sel['gain']}"


def _acc(r: dict[str, Any]) -> tuple[str, str]:
    return (
        f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f}",
        f"[{100 * r['test_acc_ci95_lo']:.1f}, {100 * r['test_acc_ci95_hi']:.1f}]",
    )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (accuracy in percent)."""
    lines = [
        "| method | what | test acc. (%) | 95% CI | val. acc. (%) | train loss | orth. error "
        "| s/epoch | selected |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc, ci = _acc(r)
        lines.append(
            f"| {r['method']} | {r['label']} | {acc} | {ci} | {100 * r['val_acc_mean']:.1f} | "
            f"{r['train_loss']:.3f} | {r['ortho_error']:.3f} | {r['sec_per_epoch']:.3f} | "
            f"{r['selected']} |"
        )
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as aligned plain text for the terminal."""
    head = (
        f"{'method':<12} {'test acc (%)':>13} {'95% CI':>13} {'val acc':>7} {'train loss':>10} "
        f"{'orth. err':>10} {'s/epoch':>8}  what"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        acc, ci = _acc(r)
        out.append(
            f"{r['method']:<12} {acc:>13} {ci:>13} {100 * r['val_acc_mean']:>7.1f} "
            f"{r['train_loss']:>10.3f} {r['ortho_error']:>10.3f} {r['sec_per_epoch']:>8.3f}  "
            f"{r['label']}"
        )
    return "\n".join(out)


def comparison_lines(
    comparisons: Sequence[dict[str, Any]], seeds: int, n_methods: int
) -> list[str]:
    """The comparisons, one sentence each (:func:`stats.verdict`), and the verdict line."""
    from . import stats

    lines = []
    if comparisons and seeds < stats.MIN_SEEDS_FOR_VERDICT:
        lines.append(
            f"comparisons: {len(comparisons)} paired differences with BCa 95% intervals in "
            "results.md and results.json"
        )
    elif comparisons:
        lines.append(
            "comparisons of test accuracy (paired by seed; BCa 95% CI, "
            f"{stats.EXACT_UP_TO}-seed-exact sign-flip test, Holm across {len(comparisons)}):"
        )
        lines += [f"  {stats.verdict(c)}" for c in comparisons]
    if seeds < stats.MIN_SEEDS_FOR_VERDICT:
        lines.append(
            f"verdict: {stats.SMOKE_TEST} ({seeds} seed(s); "
            f"{stats.MIN_SEEDS_FOR_VERDICT} or more give one)"
        )
    elif not comparisons:
        lines.append(
            "verdict: nothing to compare (one method, or no reference: plain or soft/srip)"
            if n_methods > 0
            else "verdict: nothing to compare"
        )
    else:
        sig = [c for c in comparisons if c["significant"]]
        if not sig:
            lines.append(
                f"verdict: no significant difference in {len(comparisons)} comparison(s) "
                f"(Holm, alpha {stats.ALPHA})"
            )
        else:
            said = "; ".join(f"{c['a']} {'>' if c['diff_mean'] > 0 else '<'} {c['b']}" for c in sig)
            lines.append(
                f"verdict: {len(sig)} of {len(comparisons)} difference(s) significant "
                f"(Holm, alpha {stats.ALPHA}): {said}"
            )
    return lines


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _header(payload: dict[str, Any]) -> str:
    config = payload["config"]
    split = payload["split"]
    if config["tune"]:
        g = config["grid"]
        how = (
            f"tuned on validation: each method's grid (learning rates {g['lrs']}; "
            f"orders {g['orders']} for aon/aon-fro; weights {g['lambdas']} for soft/srip; "
            f"decays {g['decays']} for wd; head/gain policies "
            f"{[('head' if s['normalise_head'] else 'free') + ':' + s['gain'] for s in g['scales']]} "
            f"for the normalisations) trained on seeds {config['tune_seeds']}, the best mean "
            f"validation accuracy selected, and trained again on seeds {config['eval_seeds']}"
        )
    else:
        how = (
            f"one configuration (Adam lr {config['lr']:g}; {config['scale']}), not tuned, "
            f"seeds {config['eval_seeds']}"
        )
    return (
        f"- data: {config['dataset']}, model: {config['model']}, {config['epochs']} epochs, "
        f"batch {config['batch_size']}; split train {split['train']} / val {split['val']} / "
        f"test {split['test']} (validation carved from the training set per seed)\n"
        f"- {how}\n"
        f"- commit {payload['commit']}; {payload['machine']['processor']}, "
        f"{payload['machine']['cpu_count']} CPUs, torch {payload['machine']['torch']}, "
        f"{payload['machine']['threads']} thread(s), {payload['machine']['device']}\n"
        "- test accuracy of the reported seeds (test set read once per run, after its last "
        "epoch; `es`: at its best validation epoch), mean ± sample std and BCa 95% interval "
        "of the mean; val. acc.: the same runs on validation; train loss: mean cross-entropy "
        "over the last epoch's batches; orth. error: mean over the normalised layers of "
        "||W W^T - I||_F (short side, gain left out); s/epoch: median over epochs of the "
        "training time of one epoch, mean over seeds\n"
    )


def results_markdown(payload: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """``results.md``: the header, the table of ``rows`` (:func:`summarise`), the comparisons
    and the verdict, and the images of :data:`PLOTS`."""
    from . import stats

    config = payload["config"]
    comps = payload["comparisons"]
    lines = comparison_lines(comps, config["seeds"], len(rows))
    said = (
        [stats.verdict(c) for c in comps] if config["seeds"] >= stats.MIN_SEEDS_FOR_VERDICT else []
    )
    sentences = "\n".join(f"- {ln}" for ln in [*said, lines[-1]])
    refs = ", ".join(payload["references"]) or "none"
    images = "\n\n".join(f"![{c}]({p})" for c, p in zip(_CAPTIONS, PLOTS, strict=True))
    return (
        f"# aon-func {config['command']}\n\n{_header(payload)}\n{markdown_table(rows)}\n\n"
        f"## Comparisons\n\nReferences: {refs} (plain, and the regulariser of the best "
        f"validation accuracy). Paired differences of test accuracy (same seed, same batches), "
        f"BCa 95% intervals ({10_000:,} resamples), sign-flip permutation test (exact up to "
        f"{stats.EXACT_UP_TO} seeds), Holm across the comparisons, alpha {stats.ALPHA}.\n\n"
        + (_comparison_table(comps) + "\n\n" if comps else "")
        + f"{sentences}\n\n{images}\n"
    )


def write_results(
    out: Path, payload: dict[str, Any], *, write_json: bool = True
) -> list[dict[str, Any]]:
    """Write ``results.json`` (unless not ``write_json``), ``results.csv`` and ``results.md``
    into ``out``; return the rows (:func:`summarise`)."""
    rows = summarise(payload["methods"])
    payload = {**payload, "summary": rows}
    out.mkdir(parents=True, exist_ok=True)
    if write_json:  # first: the numbers are kept even if a table fails
        _atomic_write_text(out / "results.json", json.dumps(payload, indent=1) + "\n")
    fields = list(rows[0]) if rows else []
    tmp = out / f".results.csv.tmp{os.getpid()}"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "results.csv")
    _atomic_write_text(out / "results.md", results_markdown(payload, rows))
    return rows


def _comparison_table(comps: Sequence[dict[str, Any]]) -> str:
    lines = ["| a | b | a − b (points) | 95% CI | p | p (Holm) |", "|---|---|---:|---:|---:|---:|"]
    for c in comps:
        lines.append(
            f"| {c['a']} | {c['b']} | {100 * c['diff_mean']:+.2f} | "
            f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] | {c['p']:.3g} | "
            f"{c['p_holm']:.3g} |"
        )
    return "\n".join(lines)


def _finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite real number (not a bool), else ``None``."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _finite_mean(xs: Iterable[Any]) -> float | None:
    """The mean of the finite numbers among ``xs``; ``None`` if there are none."""
    vals = [v for v in map(_finite, xs) if v is not None]
    return statistics.fmean(vals) if vals else None


def steps_per_epoch(config: Mapping[str, Any], split: Mapping[str, Any] | None) -> int | None:
    """The optimiser steps of one epoch, ``ceil(split["train"] / config["batch_size"])``;
    ``None`` when either is missing or not a positive integer."""
    n = (split or {}).get("train")
    b = config.get("batch_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, b)):
        return None
    return -(-int(n) // int(b))  # type: ignore[arg-type]


def _records(rs: Sequence[Mapping[str, Any]]) -> Iterable[tuple[int, Mapping[str, Any]]]:
    """``(epoch, record)`` of every history record of the runs ``rs`` (the epoch as recorded,
    else its 1-based position); records that are not mappings are skipped."""
    for r in rs:
        history = r.get("history")
        if not isinstance(history, list):
            continue
        for i, h in enumerate(history):
            if isinstance(h, Mapping):
                e = h.get("epoch")
                yield (e if isinstance(e, int) and not isinstance(e, bool) else i + 1), h


def mean_curve(rs: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(epochs, means)``: per epoch, the mean over the runs ``rs`` of ``history[key]``
    (its finite values only; epochs without one are left out)."""
    per_epoch: dict[int, list[Any]] = {}
    for e, h in _records(rs):
        per_epoch.setdefault(e, []).append(h.get(key))
    epochs, means = [], []
    for e in sorted(per_epoch):
        m = _finite_mean(per_epoch[e])
        if m is not None:
            epochs.append(e)
            means.append(m)
    return epochs, means


def layer_band(
    rs: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(epochs, median, low, high)`` of the per-layer ``history[key]`` (``cond``,
    ``grad_norm``: a dict layer -> number): per epoch and layer the mean over the runs ``rs``
    (finite values only), then the median, minimum and maximum over the layers. Epochs
    without a finite value are left out."""
    per_epoch: dict[int, dict[str, list[Any]]] = {}
    for e, h in _records(rs):
        layers = h.get(key)
        if isinstance(layers, Mapping):
            for name, v in layers.items():
                per_epoch.setdefault(e, {}).setdefault(str(name), []).append(v)
    epochs: list[int] = []
    med: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    for e in sorted(per_epoch):
        means = [m for m in map(_finite_mean, per_epoch[e].values()) if m is not None]
        if means:
            epochs.append(e)
            med.append(statistics.median(means))
            lo.append(min(means))
            hi.append(max(means))
    return epochs, med, lo, hi


def speed_point(
    rs: Sequence[Mapping[str, Any]], steps: int | None, ci95: Any
) -> tuple[float, float, tuple[float, float] | None] | None:
    """``(x, y, err)`` of one method in ``speed_accuracy.png``: the mean ``sec_per_epoch``
    of its runs ``rs`` over ``steps`` (per epoch; ``None``: seconds per epoch), the mean
    test accuracy in percent, and the distances from it down and up to the interval
    ``ci95`` (``None`` unless two finite ends). ``None`` without a finite positive time or a
    finite accuracy."""
    secs = _finite_mean(r.get("sec_per_epoch") for r in rs)
    acc = _finite_mean(r.get("test_acc") for r in rs)
    if secs is None or acc is None or secs <= 0:
        return None
    y = 100 * acc
    ends = [_finite(v) for v in ci95] if isinstance(ci95, list | tuple) and len(ci95) == 2 else []
    err = None
    if len(ends) == 2 and ends[0] is not None and ends[1] is not None:
        err = (max(y - 100 * ends[0], 0.0), max(100 * ends[1] - y, 0.0))
    return secs / (steps or 1), y, err


def _tag(method: str, label: Any) -> str:
    """``method``, with its label when that says more (``aon: AON K=2``)."""
    return f"{method}: {label}" if isinstance(label, str) and label and label != method else method


def _no_data(ax: Any, what: str) -> None:
    ax.text(
        0.5, 0.5, f"no {what} in results.json", ha="center", va="center", transform=ax.transAxes
    )


def write_plots(
    out: Path,
    config: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    *,
    split: Mapping[str, Any] | None = None,
    intervals: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the images of :data:`PLOTS` into ``out``; return their paths.

    ``runs`` are the runs of every method (each with its ``method``), ``split``
    the ``results.json`` split (its ``train`` size and ``config["batch_size"]``
    give the steps per epoch) and ``intervals`` each method's ``test_acc_ci95``.

    - ``accuracy.png``: mean validation accuracy per epoch per method;
    - ``spectra.png``: singular values of one hidden layer per method (first
      seed, end of training);
    - ``speed_accuracy.png``: mean test accuracy (percent, the BCa interval as
      error bar) against the training time of one step (``sec_per_epoch`` over
      the steps per epoch; seconds per epoch where those are unknown), log x;
    - ``training.png``: mean training loss against steps (else epochs), log y;
    - ``conditioning.png``: the condition number of each layer's weight as
      used and the mean norm of its raw gradient, per epoch: per method the
      median over the layers of the mean over the runs, and the band from
      the smallest to the largest layer; log y.

    Missing keys and values that are not finite numbers are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(str(r.get("method", "?")), []).append(r)
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(by_method)}
    title = f"{config.get('dataset', '?')} / {config.get('model', '?')}"
    seeds = config.get("seeds", "?")
    steps = steps_per_epoch(config, split)
    intervals = intervals or {}
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def legend(ax: Any) -> None:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in by_method.items():
        epochs, acc = mean_curve(rs, "val_acc")
        if epochs:
            ax.plot(epochs, [100 * a for a in acc], label=method, color=colours[method], lw=1.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation accuracy (%), mean of {seeds} seed(s)")
    ax.set_title(f"{title}: validation accuracy")
    ax.grid(alpha=0.3)
    legend(ax)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in by_method.items():
        spectrum = rs[0].get("spectrum")
        s = [(i, v) for i, v in enumerate(spectrum or [], 1) if (_finite(v) or 0.0) > 0]
        if s:
            ax.plot(*zip(*s, strict=True), label=method, color=colours[method], lw=1.4)
    probe = runs[0].get("probe_layer", "?") if runs else "?"
    ax.set_xlabel("index")
    ax.set_ylabel("singular value (gain left out)")
    if ax.lines:
        ax.set_yscale("log")
    ax.set_title(f"{title}: singular values of {probe} after training")
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    save(fig, "spectra.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in by_method.items():
        point = speed_point(rs, steps, intervals.get(method))
        if point is None:
            continue
        x, y, err = point
        yerr = None if err is None else [[err[0]], [err[1]]]
        ax.errorbar([x], [y], yerr=yerr, fmt="o", color=colours[method], capsize=3, ms=5)
        ax.annotate(
            _tag(method, rs[0].get("label")),
            (x, y),
            xytext=(5, 3),
            textcoords="offset points",
            fontsize=7,
        )
    if ax.lines:
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.1)  # room for the labels
    else:
        _no_data(ax, "finite sec_per_epoch and test_acc")
    what = "training seconds per step" if steps else "training seconds per epoch"
    ax.set_xlabel(f"{what} (mean of {seeds} seed(s), log scale)")
    ax.set_ylabel("test accuracy (%), mean and BCa 95% interval")
    ax.set_title(f"{title}: accuracy against time per {'step' if steps else 'epoch'}")
    ax.grid(alpha=0.3, which="both")
    save(fig, "speed_accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in by_method.items():
        epochs, loss = mean_curve(rs, "train_loss")
        pts = [(e * (steps or 1), v) for e, v in zip(epochs, loss, strict=True) if v > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=method, color=colours[method], lw=1.4)
    if ax.lines:
        ax.set_yscale("log")
    else:
        _no_data(ax, "training loss")
    ax.set_xlabel(
        f"training steps ({steps} per epoch, at the end of each epoch)" if steps else "epoch"
    )
    ax.set_ylabel(f"training loss (mean over the epoch's batches and {seeds} seed(s))")
    ax.set_title(f"{title}: training loss")
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    save(fig, "training.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        ("cond", "condition number of the weight as used"),
        ("grad_norm", "mean norm of the raw gradient per step"),
    )
    for ax, (key, what) in zip(axes, panels, strict=True):
        for method, rs in by_method.items():
            epochs, med, lo, hi = layer_band(rs, key)
            keep = [i for i, v in enumerate(med) if v > 0]
            if not keep:
                continue
            e = [epochs[i] for i in keep]
            c = colours[method]
            ax.plot(e, [med[i] for i in keep], label=method, color=c, lw=1.4)
            ax.fill_between(
                e,
                [lo[i] if lo[i] > 0 else med[i] for i in keep],
                [hi[i] for i in keep],
                color=c,
                alpha=0.15,
                lw=0,
            )
        if ax.lines:
            ax.set_yscale("log")
        else:
            _no_data(ax, f"per-layer {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{what}, per layer")
        ax.set_title(f"{key}: median over layers (band: min-max)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        legend(ax)
    fig.suptitle(f"{title}: per-layer conditioning, mean of {seeds} seed(s)")
    save(fig, "conditioning.png")
    return written

"""Results: aggregate runs per method, write JSON/CSV/Markdown and the plots, print a table."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "comparison_lines",
    "markdown_table",
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
        rows.append(
            {
                "method": method,
                "label": m["label"],
                "seeds": len(rs),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "test_acc_ci95_lo": m["test_acc_ci95"][0],
                "test_acc_ci95_hi": m["test_acc_ci95"][1],
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


def write_results(out: Path, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out``; return the rows."""
    from . import stats

    rows = summarise(payload["methods"])
    payload = {**payload, "summary": rows}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "results.json", json.dumps(payload, indent=1) + "\n")
    fields = list(rows[0]) if rows else []
    tmp = out / f".results.csv.tmp{os.getpid()}"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "results.csv")
    config = payload["config"]
    comps = payload["comparisons"]
    lines = comparison_lines(comps, config["seeds"], len(rows))
    from . import stats as _stats

    said = (
        [_stats.verdict(c) for c in comps]
        if config["seeds"] >= _stats.MIN_SEEDS_FOR_VERDICT
        else []
    )
    sentences = "\n".join(f"- {ln}" for ln in [*said, lines[-1]])
    refs = ", ".join(payload["references"]) or "none"
    md = (
        f"# aon-func {config['command']}\n\n{_header(payload)}\n{markdown_table(rows)}\n\n"
        f"## Comparisons\n\nReferences: {refs} (plain, and the regulariser of the best "
        f"validation accuracy). Paired differences of test accuracy (same seed, same batches), "
        f"BCa 95% intervals ({10_000:,} resamples), sign-flip permutation test (exact up to "
        f"{stats.EXACT_UP_TO} seeds), Holm across the comparisons, alpha {stats.ALPHA}.\n\n"
        + (_comparison_table(comps) + "\n\n" if comps else "")
        + f"{sentences}\n"
        "\n![validation accuracy](accuracy.png)\n\n![singular values](spectra.png)\n"
    )
    _atomic_write_text(out / "results.md", md)
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


def write_plots(out: Path, config: dict[str, Any], runs: Sequence[dict[str, Any]]) -> None:
    """``accuracy.png`` (mean validation accuracy per epoch per method) and ``spectra.png``
    (singular values of one hidden layer per method, first seed, end of training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    cmap = plt.get_cmap("tab20")
    title = f"{config['dataset']} / {config['model']}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, rs) in enumerate(by_method.items()):
        n = min(len(r["history"]) for r in rs)
        epochs = [rs[0]["history"][e]["epoch"] for e in range(n)]
        acc = [statistics.fmean(r["history"][e]["val_acc"] for r in rs) for e in range(n)]
        ax.plot(epochs, [100 * a for a in acc], label=method, color=cmap(i % 20), lw=1.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation accuracy (%), mean of {config['seeds']} seed(s)")
    ax.set_title(f"{title}: validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, rs) in enumerate(by_method.items()):
        s = rs[0]["spectrum"]
        ax.plot(range(1, len(s) + 1), s, label=method, color=cmap(i % 20), lw=1.4)
    probe = runs[0]["probe_layer"] if runs else "?"
    ax.set_xlabel("index")
    ax.set_ylabel("singular value (gain left out)")
    ax.set_yscale("log")
    ax.set_title(f"{title}: singular values of {probe} after training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=110)
    plt.close(fig)

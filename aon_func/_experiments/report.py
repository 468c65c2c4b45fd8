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

__all__ = ["markdown_table", "summarise", "write_plots", "write_results"]


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): means over seeds (sample std for accuracy)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by_method.items():
        acc_mean, acc_std = _mean_std([r["test_acc"] for r in rs])
        rows.append(
            {
                "method": method,
                "label": rs[0]["label"],
                "seeds": len(rs),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "train_loss": statistics.fmean(r["train_loss"] for r in rs),
                "ortho_error": statistics.fmean(r["ortho_error"] for r in rs),
                "sec_per_epoch": statistics.fmean(r["sec_per_epoch"] for r in rs),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (accuracy in percent)."""
    lines = [
        "| method | what | test acc. (%) | train loss | orth. error | s/epoch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['label']} | {100 * r['test_acc_mean']:.1f} ± "
            f"{100 * r['test_acc_std']:.1f} | {r['train_loss']:.3f} | {r['ortho_error']:.3f} | "
            f"{r['sec_per_epoch']:.3f} |"
        )
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as aligned plain text for the terminal."""
    head = f"{'method':<12} {'test acc (%)':>14} {'train loss':>10} {'orth. err':>10} {'s/epoch':>8}  what"
    out = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f}"
        out.append(
            f"{r['method']:<12} {acc:>14} {r['train_loss']:>10.3f} {r['ortho_error']:>10.3f} "
            f"{r['sec_per_epoch']:>8.3f}  {r['label']}"
        )
    return "\n".join(out)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _header(config: dict[str, Any]) -> str:
    return (
        f"- data: {config['dataset']}, model: {config['model']}, {config['epochs']} epochs, "
        f"batch {config['batch_size']}, Adam lr {config['lr']:g}, seeds {config['seeds']}\n"
        f"- normalised (and penalised) layers: {config['scale']}\n"
        f"- test accuracy after the last epoch, mean ± sample std over seeds; train loss: "
        "mean cross-entropy over the last epoch's batches; orth. error: "
        "mean over those layers of ||W W^T - I||_F (short side, gain left out); s/epoch: "
        "median over epochs of the training time of one epoch (evaluation excluded), "
        "mean over seeds\n"
    )


def write_results(
    out: Path, config: dict[str, Any], runs: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out``; return the rows."""
    rows = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(
        out / "results.json",
        json.dumps({"config": config, "summary": rows, "runs": list(runs)}, indent=1) + "\n",
    )
    fields = list(rows[0]) if rows else []
    tmp = out / f".results.csv.tmp{os.getpid()}"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "results.csv")
    md = (
        f"# aon-func {config['command']}\n\n{_header(config)}\n{markdown_table(rows)}\n"
        "\n![test accuracy](accuracy.png)\n\n![singular values](spectra.png)\n"
    )
    _atomic_write_text(out / "results.md", md)
    return rows


def write_plots(out: Path, config: dict[str, Any], runs: Sequence[dict[str, Any]]) -> None:
    """``accuracy.png`` (mean test accuracy per epoch per method) and ``spectra.png``
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
        acc = [statistics.fmean(r["history"][e]["test_acc"] for r in rs) for e in range(n)]
        ax.plot(epochs, [100 * a for a in acc], label=method, color=cmap(i % 20), lw=1.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test accuracy (%), mean of {config['seeds']} seed(s)")
    ax.set_title(f"{title}: test accuracy")
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

"""Summarise the study's results folders (docs/results.md, "The study's commands").

Reads ``STUDY/*/results.json`` (never writes there) and prints, per table, the
reported test accuracy of every method (mean and BCa 95% interval over the
evaluation seeds, with the configuration selected on validation, and how many
of all its runs, tuning included, left chance level, and how far its own
choices moved the validation accuracy at the selected learning rate) and every paired
comparison with its Holm-corrected p-value. With ``--copy-to DIR`` it also copies each folder's ``results.md``, ``results.csv`` and plots (those of
``DIR/report/``, written by ``aon-func report DIR``, where there is one) to
``DIR/<table>/``, with a ``results.json`` without the per-run, per-epoch
``history`` and checkpoint paths (they stay in the run folder; the plots show
the histories), so that the docs hold the numbers behind every sentence.

    python scripts/study_summary.py runs/study
    python scripts/study_summary.py runs/study --copy-to docs/study
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

COPIED = (
    "results.md",
    "results.csv",
    "accuracy.png",
    "spectra.png",
    "speed_accuracy.png",
    "training.png",
    "conditioning.png",
    "approx.json",
    "approx.md",
    "jacobian.json",
    "jacobian.md",
    "jacobian.png",
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


CHANCE = 0.2
"""Validation accuracy above which a run counts as having left chance level (twice the
10-class chance; every data set of the study has 10 classes)."""


def _above_chance(method: dict[str, Any]) -> str:
    """Runs of every configuration tried (tuning seeds) and of the evaluation seeds whose
    validation accuracy exceeds :data:`CHANCE`, as ``n/N``."""
    accs = [a for g in method.get("grid", []) for a in g.get("val_accs", [])]
    accs += [r["val_acc"] for r in method["runs"]]
    return f"{sum(a > CHANCE for a in accs)}/{len(accs)}"


def _spread(method: dict[str, Any]) -> str:
    """Max minus min of the mean validation accuracy (points) over the configurations tried at
    the selected learning rate: what the method's own choices (order, penalty weight, decay,
    head/gain policy) moved it by; ``-`` when there was one configuration at that rate."""
    sel = method.get("selected")
    accs = [g["val_acc"] for g in method.get("grid", []) if sel and g["lr"] == sel["lr"]]
    return f"{100 * (max(accs) - min(accs)):.1f}" if len(accs) > 1 else "-"


def table(name: str, res: dict[str, Any]) -> str:
    """One folder's methods and comparisons as markdown."""
    cfg = res["config"]
    split = res["split"]
    lines = [
        f"### {name}",
        "",
        f"{cfg['dataset']} / {cfg['model']}, {cfg['epochs']} epochs, "
        f"{len(cfg['eval_seeds'])} evaluation seeds, split {split['train']} / {split['val']} / "
        f"{split['test']}, commit `{res['commit'][:10]}`, "
        f"{'tuned' if cfg['tune'] else 'not tuned'}.",
        "",
        "| method | selected on validation | test acc. (%) | 95% CI | val. acc. (%) | s/epoch "
        "| runs above chance | spread at its lr |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["summary"]:
        m = res["methods"][row["method"]]
        lines.append(
            f"| {row['method']} | {row['selected']} "
            f"| {_pct(row['test_acc_mean'])} ± {_pct(row['test_acc_std'])} "
            f"| [{_pct(row['test_acc_ci95_lo'])}, {_pct(row['test_acc_ci95_hi'])}] "
            f"| {_pct(row['val_acc_mean'])} | {row['sec_per_epoch']:.3f} | {_above_chance(m)} "
            f"| {_spread(m)} |"
        )
    comps = res["comparisons"]
    if comps:
        lines += [
            "",
            f"References: {', '.join(res['references'])}. Paired differences a − b "
            f"(points), Holm across {len(comps)}:",
            "",
            "| a | b | diff. | 95% CI | p | p (Holm) | significant |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for c in comps:
            sig = {True: "**yes**", False: "no", None: "(too few seeds)"}[c["significant"]]
            lines.append(
                f"| {c['a']} | {c['b']} | {100 * c['diff_mean']:+.2f} "
                f"| [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] "
                f"| {c['p']:.3g} | {c['p_holm']:.3g} | {sig} |"
            )
    return "\n".join(lines)


def _trimmed(res: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(res))
    for m in out["methods"].values():
        for r in m["runs"]:
            r.pop("checkpoint", None)
            r.pop("history", None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the folder holding one folder per table")
    parser.add_argument("--copy-to", type=Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)
    folders = sorted(p.parent for p in args.study.glob("*/results.json"))
    if not folders:
        print(f"study_summary: no */results.json under {args.study}", file=sys.stderr)
        return 2
    for folder in folders:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        print(table(folder.name, res), end="\n\n")
        if args.copy_to is not None:
            dest = args.copy_to / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in COPIED:
                # ``aon-func report DIR`` writes DIR/report/ with every plot of the current code
                for src in (folder / "report" / name, folder / name):
                    if src.is_file():
                        shutil.copyfile(src, dest / name)
                        break
            text = json.dumps(_trimmed(res), indent=1, allow_nan=True)
            (dest / "results.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

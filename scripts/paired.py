"""Paired comparisons between chosen methods of one results folder.

``aon-func compare`` compares every method with its references (``plain`` and
the best regulariser); an ablation compares other pairs. This prints, for
each ``A:B`` pair, the paired difference of test accuracy over the seeds the
two share (same seed: same initial weights, split and batches), its BCa 95%
interval, the exact sign-flip p-value and Holm's correction across the pairs
given, with the same functions as ``compare`` (``aon_func._experiments.stats``).
It reads ``DIR/results.json`` and writes nothing.

    python scripts/paired.py runs/study/ablation-power-iterations sn@4:sn aon-2@48:aon-2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aon_func._experiments import stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a compare --out folder")
    parser.add_argument("pairs", nargs="+", metavar="A:B", help="method names of the folder")
    args = parser.parse_args(argv)
    res = json.loads((args.folder / "results.json").read_text(encoding="utf-8"))
    methods = res["methods"]
    pairs = []
    for text in args.pairs:
        a, sep, b = text.partition(":")
        if not sep or a not in methods or b not in methods:
            print(f"paired: {text!r}: expected A:B of {sorted(methods)}", file=sys.stderr)
            return 2
        pairs.append((a, b))
    scores: dict[str, list[float]] = {}
    for a, b in pairs:
        ra = {r["seed"]: r["test_acc"] for r in methods[a]["runs"]}
        rb = {r["seed"]: r["test_acc"] for r in methods[b]["runs"]}
        seeds = sorted(set(ra) & set(rb))
        scores[f"{a}|{b}|a"] = [ra[s] for s in seeds]
        scores[f"{a}|{b}|b"] = [rb[s] for s in seeds]
    rows = stats.compare(scores, [(f"{a}|{b}|a", f"{a}|{b}|b") for a, b in pairs])
    for (a, b), row in zip(pairs, rows, strict=True):
        row["a"], row["b"] = a, b
        print(stats.verdict(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

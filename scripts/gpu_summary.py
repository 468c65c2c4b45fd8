#!/usr/bin/env python3
"""One screen of the GPU check: the figures of ``aon-func bench --device cuda`` against the targets.

Reads the JSON files that ``scripts/gpu_check.sh`` writes (each optional):

- ``--eager``: float32, no TF32: the eager engine's figures, ATen and kernel
  counts, memory (the GPU-engine issue's table, and the memory row of the
  compile/precision issue);
- ``--tf32``: TF32, compiled ``apply`` in the default and ``reduce-overhead``
  modes with their compile times;
- ``--steps``: TF32, the ResNet-18 training step, eager and compiled;
- ``--bf16``: products in bf16 (``--dtype bfloat16``), compiled ``apply``.

Each row prints the measured value, the target and ``met`` / ``MISSED`` /
``not measured`` (the part did not run, timed out before it, or failed to
compile; the reason is in the part's log). Exit status 0 whatever was
measured: the summary reports, it does not judge the run.

Usage: ``python scripts/gpu_summary.py --eager docs/bench-cuda.json --tf32 ... [--out summary.txt]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return None
        d = d[k]
    return d


def _cuda(res: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if res is None else _dig(res, "devices", "cuda")


def _row(model: str, row: str, mode: str, field: str) -> Getter:
    return lambda r: _dig(r, "apply", model, "rows", row, mode, field)


def _speedup(model: str, slow: str) -> Getter:
    """How many times faster ``apply auto`` is than row ``slow`` (forward)."""

    def get(r: dict[str, Any]) -> float | None:
        a = _dig(r, "apply", model, "rows", "apply auto", "fwd", "ms")
        b = _dig(r, "apply", model, "rows", slow, "fwd", "ms")
        return None if a is None or b is None or a <= 0 else b / a

    return get


def _memory(model: str) -> Getter:
    return lambda r: _dig(r, "memory", model, "rows", "K=2 auto", "over_params")


def _compile_s(model: str, row: str) -> Getter:
    return lambda r: _dig(r, "apply", model, "compile_s_by_row", row)


def _step(key: str | None) -> Getter:
    if key is None:
        return lambda r: _dig(r, "step", "resnet18", "overhead")
    return lambda r: _dig(r, "step", "resnet18", "compiled", key, "overhead")


def _calls(model: str, mode: str, what: str, where: str = "calls") -> Getter:
    if where == "calls":
        return lambda r: _dig(r, "calls", model, mode, what)
    return lambda r: _dig(r, "apply", model, "calls", mode, what)


# (issue, figure, run, getter, target, "<=" or ">=")
ROWS: list[tuple[str, str, str, Getter, float, str]] = [
    (
        "9",
        "apply fwd / roofline, ResNet-50",
        "eager",
        _row("resnet50", "apply auto", "fwd", "over_roofline"),
        2.0,
        "<=",
    ),
    (
        "9",
        "same with TF32",
        "tf32",
        _row("resnet50", "apply auto", "fwd", "over_roofline"),
        3.0,
        "<=",
    ),
    (
        "9",
        "apply fwd / roofline, MLP",
        "eager",
        _row("mlp", "apply auto", "fwd", "over_roofline"),
        2.0,
        "<=",
    ),
    (
        "9",
        "apply fwd / roofline, ResNet-18",
        "eager",
        _row("resnet18", "apply auto", "fwd", "over_roofline"),
        2.0,
        "<=",
    ),
    (
        "9",
        "apply fwd / roofline, ViT-S/16",
        "eager",
        _row("vit_s16", "apply auto", "fwd", "over_roofline"),
        2.0,
        "<=",
    ),
    (
        "9",
        "apply fwd+bwd / roofline, ResNet-50",
        "eager",
        _row("resnet50", "apply auto", "fwd+bwd", "over_roofline"),
        2.5,
        "<=",
    ),
    (
        "9",
        "apply (batched) x faster than per-layer loop, ResNet-50",
        "eager",
        _speedup("resnet50", "kernel loop"),
        3.0,
        ">=",
    ),
    ("9", "train step AON / plain, ResNet-18 b128, eager (TF32)", "steps", _step(None), 1.5, "<="),
    (
        "9",
        "apply fwd / roofline, LLaMA-1B shapes",
        "eager",
        _row("llama1b", "apply auto", "fwd", "over_roofline"),
        1.2,
        "<=",
    ),
    (
        "9",
        "CUDA kernels per apply fwd, ResNet-50",
        "eager",
        _calls("resnet50", "fwd", "kernels", "apply"),
        150,
        "<=",
    ),
    (
        "9",
        "ATen calls fwd on meta, ResNet-50",
        "eager",
        _calls("resnet50", "fwd", "aten_calls"),
        450,
        "<=",
    ),
    (
        "9",
        "ATen calls fwd+bwd on meta, ResNet-50",
        "eager",
        _calls("resnet50", "fwd+bwd", "aten_calls"),
        1200,
        "<=",
    ),
    (
        "10",
        "compile(apply) / roofline, ResNet-50, TF32: default",
        "tf32",
        _row("resnet50", "compiled", "fwd", "over_roofline"),
        1.5,
        "<=",
    ),
    (
        "10",
        "same, reduce-overhead (CUDA graphs)",
        "tf32",
        _row("resnet50", "compiled reduce-overhead", "fwd", "over_roofline"),
        1.3,
        "<=",
    ),
    (
        "10",
        "compile(apply) / roofline, GPT-2-small, TF32",
        "tf32",
        _row("gpt2", "compiled", "fwd", "over_roofline"),
        1.5,
        "<=",
    ),
    (
        "10",
        "compile(apply) / roofline, GPT-2-small, bf16 products",
        "bf16",
        _row("gpt2", "compiled", "fwd", "over_roofline"),
        1.5,
        "<=",
    ),
    (
        "10",
        "compile time (s), ResNet-50, default",
        "tf32",
        _compile_s("resnet50", "compiled"),
        30.0,
        "<=",
    ),
    (
        "10",
        "compile time (s), ResNet-50, reduce-overhead",
        "tf32",
        _compile_s("resnet50", "compiled reduce-overhead"),
        30.0,
        "<=",
    ),
    (
        "10",
        "train step AON / plain, ResNet-18 b128, compiled",
        "steps",
        _step("compiled"),
        1.25,
        "<=",
    ),
    ("10", "peak extra memory / weights, K=2, MLP", "eager", _memory("mlp"), 6.0, "<="),
    ("10", "peak extra memory / weights, K=2, ResNet-18", "eager", _memory("resnet18"), 4.0, "<="),
    ("10", "peak extra memory / weights, K=2, ResNet-50", "eager", _memory("resnet50"), 4.0, "<="),
    ("10", "peak extra memory / weights, K=2, ViT-S/16", "eager", _memory("vit_s16"), 4.0, "<="),
]


def _load(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def summarise(runs: dict[str, dict[str, Any] | None]) -> tuple[list[str], dict[str, int]]:
    """The summary's lines, and the count of rows met / missed / not measured."""
    tally = {"met": 0, "MISSED": 0, "not measured": 0}
    lines = [f"{'issue':<6}{'figure':<60}{'value':>9}  {'target':<9}verdict"]
    for issue, figure, run, get, target, op in ROWS:
        res = _cuda(runs.get(run))
        value = None if res is None else get(res)
        if value is None:
            verdict, cell = "not measured", "-"
        else:
            ok = value <= target if op == "<=" else value >= target
            verdict, cell = ("met" if ok else "MISSED"), f"{value:.2f}"
        tally[verdict] += 1
        lines.append(f"{issue:<6}{figure:<60}{cell:>9}  {op} {target:<6g}{verdict}")
    for run, data in runs.items():
        res = _cuda(data)
        if res is None:
            continue
        for section in ("apply", "step"):
            for model, r in (res.get(section) or {}).items():
                for key, why in (r.get("compile_failed") or {}).items():
                    lines.append(f"  [{run}] {section} {model}: {key} failed: {why[:120]}")
    m = next((_dig(d, "devices", "cuda", "machine") for d in runs.values() if _cuda(d)), None)
    head = (
        "GPU check: no CUDA results"
        if m is None
        else (
            f"GPU check: {m.get('cuda_device')}, torch {m.get('torch')}, CUDA {m.get('cuda_version')}"
        )
    )
    lines.insert(0, head)
    lines.append(
        f"{tally['met']} met, {tally['MISSED']} missed, {tally['not measured']} not measured "
        f"(of {len(ROWS)})"
    )
    return lines, tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for run in ("eager", "tf32", "steps", "bf16"):
        ap.add_argument(f"--{run}", default=None, help=f"bench JSON of the '{run}' part")
    ap.add_argument("--out", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    runs = {run: _load(getattr(args, run)) for run in ("eager", "tf32", "steps", "bf16")}
    lines, _ = summarise(runs)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

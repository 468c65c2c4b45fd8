"""``aon-func bench``: the performance suite (see ``docs/performance.md``).

Every figure is a ratio measured side by side in one process: the callables
of a table run in interleaved rounds after warm-up, and a ratio is the median
over rounds of the two times of the same round.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ._models import MODELS, STEP_MODELS
from ._suite import (
    BenchConfig,
    bench_apply,
    bench_memory,
    bench_neighbours,
    bench_step,
    op_counts,
)
from ._timing import machine

__all__ = ["compile_modes", "register", "run_bench"]

DEFAULT_MODELS = ("mlp", "resnet18", "resnet50", "vit_s16")
DEFAULT_STEPS = ("resnet18", "mnist1d_mlp")
DEFAULT_COMPILE = ("mlp", "resnet18")
SECTIONS = ("calls", "apply", "neighbours", "memory", "step")
MEMORY_ORDERS = (1, 2, 4)

TARGETS = {
    "fwd_over_roofline": 1.3,
    "fwd_over_kernel_loop": 1.0,
    "fwd+bwd_over_roofline": 1.5,
    "step_overhead": 1.35,
    "memory_over_params": 4.0,
}
"""Targets on the CPU, float32, ``K = 2``, ResNet-18 shapes (the performance issue)."""


def _names(value: str, known: dict[str, Any]) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known and n != "none"]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown names {unknown}; choose from {sorted(known)}")
    return [n for n in names if n != "none"]


def _at_least(low: int) -> Any:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {low}, got {value!r}"
            ) from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return n

    return parse


def _positive_seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return x


def _devices(choice: str) -> list[torch.device]:
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("aon-func bench: --device cuda, but CUDA is not available")
    return [torch.device(choice)]


def register(sub: Any) -> None:
    """Add ``bench`` to the ``aon-func`` parser."""
    p = sub.add_parser(
        "bench",
        help="performance suite: AON.apply vs loop/compile/neighbours/roofline, memory, step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        type=lambda v: _names(v, MODELS),
        default=list(DEFAULT_MODELS),
        help=f"weight-shape sets, comma-separated, from {sorted(MODELS)} or 'none' "
        f"(default: {','.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--steps",
        type=lambda v: _names(v, STEP_MODELS),
        default=list(DEFAULT_STEPS),
        help=f"training-step benchmarks from {sorted(STEP_MODELS)} or 'none' "
        f"(default: {','.join(DEFAULT_STEPS)})",
    )
    p.add_argument(
        "--sections",
        type=lambda v: _names(v, dict.fromkeys(SECTIONS)),
        default=list(SECTIONS),
        help=f"what to measure, from {list(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="where to measure: cpu, cuda, or all (the CPU, then CUDA when torch sees it; "
        "default: all)",
    )
    p.add_argument("--order", type=_at_least(1), default=2, help="Taylor order K >= 1 (default: 2)")
    p.add_argument("--repeats", type=_at_least(1), default=9, help="timed rounds (default: 9)")
    p.add_argument(
        "--warmup", type=_at_least(0), default=2, help="untimed rounds first (default: 2)"
    )
    p.add_argument(
        "--budget",
        type=_positive_seconds,
        default=25.0,
        help="seconds per table after which rounds stop (at least 3 rounds, 2 for the "
        "neighbours; default: 25)",
    )
    p.add_argument(
        "--compile",
        type=lambda v: v if v in ("all", "none") else _names(v, MODELS),
        default=None,
        help="models that get the torch.compile column: a comma-separated list, 'all' or "
        f"'none' (default: {','.join(DEFAULT_COMPILE)}, none with --quick; compiling takes about "
        "a minute a model and mode)",
    )
    p.add_argument("--no-compile", action="store_true", help="same as --compile none")
    p.add_argument(
        "--compile-steps",
        action="store_true",
        help="also time the training steps with their forward and loss compiled (each compile "
        "mode; a minute or more per model and mode on a CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of AON's matrix products: float32 (default) or bfloat16 "
        "(AON(matmul_dtype=torch.bfloat16): bf16 operands, float32 accumulation; the roofline's "
        "products in bf16 too; the steps under bf16 autocast). Weights stay float32",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 in CUDA float32 matrix products and convolutions "
        "(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32; no effect on "
        "the CPU)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile AON.apply forward+backward (torch.profiler, self CPU time per op)",
    )
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch.set_num_threads first")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: the process's CPU time, which with "
        "--threads 1 is robust to other load on a shared machine (CPU devices only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --models tiny --steps tiny --repeats 3 --warmup 1, no compile unless "
        "--compile names tiny; memory and neighbours included (--dtype and --tf32 still apply)",
    )
    p.add_argument(
        "--json",
        default="aon-func-bench.json",
        help="where to write the results (default: aon-func-bench.json; '' to skip)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.json:
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            what = "is a folder" if target.is_dir() else f"{target.parent} is not a folder"
            print(f"aon-func bench: --json {args.json}: {what} (give a file path)", file=sys.stderr)
            return 2
    if args.quick:
        args.models, args.steps = ["tiny"], ["tiny"]
        args.repeats, args.warmup = 3, 1
    if args.compile is None:
        args.compile = "none" if args.quick else list(DEFAULT_COMPILE)
    if args.no_compile or args.compile == "none":
        compiled: list[str] = []
    elif args.compile == "all":
        compiled = list(MODELS)
    else:
        compiled = list(args.compile)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = BenchConfig(
        order=args.order,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=args.budget,
        compile=tuple(compiled),
        dtype=torch.float32,
        clock=args.clock,
        profile=args.profile,
        matmul_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
        compile_steps=args.compile_steps,
    )

    def save(results: dict[str, Any]) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    try:
        run_bench(
            devices=_devices(args.device),
            models=args.models,
            steps=args.steps,
            sections=args.sections,
            cfg=cfg,
            log=print,
            save=save,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def run_bench(
    *,
    devices: list[torch.device],
    models: list[str],
    steps: list[str],
    sections: list[str],
    cfg: BenchConfig,
    log: Any = print,
    save: Any = None,
) -> dict[str, Any]:
    """Run the suite and return the JSON-able results.

    ``log`` receives the tables; ``save``, when given, the results so far after
    every table (an interrupted run keeps what it measured).
    """

    def saved(results: dict[str, Any]) -> None:
        results["elapsed_s"] = time.perf_counter() - started
        if save is not None:
            save(results)

    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "aon-func bench",
        "config": {
            "order": cfg.order,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "budget_s": cfg.budget_s,
            "compile": list(cfg.compile),
            "compile_steps": cfg.compile_steps,
            "dtype": str(cfg.dtype),
            "matmul_dtype": str(cfg.matmul_dtype or cfg.dtype),
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "clock": cfg.clock,
            "profile": cfg.profile,
            "models": models,
            "steps": steps,
            "sections": sections,
        },
        "targets": TARGETS,
        "devices": {},
    }
    for device in devices:
        dcfg = cfg._replace(compile_modes=compile_modes(device))
        res: dict[str, Any] = {
            "machine": machine(device),
            "compile_modes": list(dcfg.compile_modes),
            "apply": {},
            "neighbours": {},
            "memory": {},
            "step": {},
        }
        results["devices"][str(device)] = res
        m = res["machine"]
        log(
            f"\n=== {device}: {m.get('cuda_device', m['cpu'])}, torch {m['torch']}, "
            f"{m['torch_num_threads']} threads, float32 weights, products in "
            f"{_precision(device, dcfg)}, K = {cfg.order} ==="
        )
        for name in models:
            if "calls" in sections:
                r = op_counts(name, torch.device("meta"), cfg.order)
                res.setdefault("calls", {})[name] = r
                log(_calls_line(name, r))
                saved(results)
            if "apply" in sections:
                r = bench_apply(name, device, dcfg)
                res["apply"][name] = r
                log(_apply_table(name, r))
                saved(results)
            if "neighbours" in sections:
                r = bench_neighbours(name, device, dcfg)
                res["neighbours"][name] = r
                log(_neighbour_table(name, r, cfg.order))
                saved(results)
            if "memory" in sections:
                r = bench_memory(name, device, dcfg, MEMORY_ORDERS)
                res["memory"][name] = r
                log(_memory_table(name, r))
                saved(results)
        if "step" in sections:
            for name in steps:
                r = bench_step(name, device, dcfg)
                res["step"][name] = r
                saved(results)
                log(_step_lines(r))
        res["targets"] = _targets(res, cfg)
        if res["targets"]:
            note = next(iter(res["targets"].values())).get("note")
            log(
                "\ntargets (ResNet-18 shapes, CPU, float32, K = 2)"
                + (f" [{note}]" if note else "")
                + ":"
            )
            for key, v in res["targets"].items():
                log(
                    f"  {key:<24} {v['value']:>6.2f}  target <= {v['target']:<5} {'met' if v['met'] else 'MISSED'}"
                )
    saved(results)
    log(f"\nelapsed {results['elapsed_s']:.0f} s")
    return results


def compile_modes(device: torch.device) -> tuple[str, ...]:
    """The ``torch.compile`` modes measured on ``device``: CUDA graphs need CUDA."""
    return ("default", "reduce-overhead") if device.type == "cuda" else ("default",)


def _precision(device: torch.device, cfg: BenchConfig) -> str:
    if cfg.matmul_dtype == torch.bfloat16:
        return "bf16 (float32 accumulation)"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "TF32"
    return "float32"


def _step_lines(r: dict[str, Any]) -> str:
    lines = [
        f"\nstep  {r['model']}{' (bf16 autocast)' if r['autocast_bf16'] else ''}: "
        f"plain {r['plain_ms']:.1f} ms, AON {r['aon_ms']:.1f} ms, "
        f"overhead x{r['overhead']:.2f} ({r['rounds']} rounds, spread {r['spread']:.0%})"
    ]
    for key, c in r["compiled"].items():
        lines.append(
            f"  {key}: plain {c['plain_ms']:.1f} ms, AON {c['aon_ms']:.1f} ms, overhead "
            f"x{c['overhead']:.2f}, AON compiled / eager x{c['aon_over_eager_aon']:.2f}; "
            f"compile {c['compile_s']:.0f} s"
        )
    lines.extend(f"  {key}: failed: {why}" for key, why in r["compile_failed"].items())
    return "\n".join(lines)


def _count_cell(c: dict[str, Any]) -> str:
    kernels = f", {c['kernels']} kernels" if c.get("kernels") is not None else ""
    return f"{c['aten_calls']} ATen calls{kernels}"


def _calls_line(name: str, r: dict[str, Any]) -> str:
    return (
        f"\ncalls  {name} on meta (the accelerator path, host work only): "
        f"fwd {_count_cell(r['fwd'])}, fwd+bwd {_count_cell(r['fwd+bwd'])}; {r['plan']}"
    )


def _apply_table(name: str, r: dict[str, Any]) -> str:
    g = r["roofline_gflop"]
    c = r["calls"]
    lines = [
        f"\napply  {r['model']}: {r['n_matrices']} matrices in {r['n_groups']} shape groups, "
        f"{r['rounds']} rounds; roofline {g['fwd']:.2f} / {g['fwd+bwd']:.2f} GFLOP"
        + "".join(f"; {k}: compile {s:.0f} s" for k, s in r["compile_s_by_row"].items()),
        f"  auto plan: {r['plan']}; fwd {_count_cell(c['fwd'])}, "
        f"fwd+bwd {_count_cell(c['fwd+bwd'])}",
        f"  {'':<14}{'fwd ms':>9}{'/roofline':>10}{'/loop':>7}{'fwd+bwd ms':>12}{'/roofline':>10}{'/loop':>7}",
    ]
    for key, row in r["rows"].items():
        f, b = row["fwd"], row["fwd+bwd"]
        lines.append(
            f"  {key:<14}{f['ms']:>9.2f}{f['over_roofline']:>10.2f}{f['over_kernel_loop']:>7.2f}"
            f"{b['ms']:>12.2f}{b['over_roofline']:>10.2f}{b['over_kernel_loop']:>7.2f}"
        )
    lines.extend(f"  {key}: failed: {why}" for key, why in r["compile_failed"].items())
    if r.get("profile"):
        lines.append(f"  profile of {r['auto']} fwd+bwd (self CPU time, torch.profiler):")
        lines.extend(
            f"    {p['op']:<34}{p['self_ms']:>9.2f} ms{p['share']:>7.1%}{p['calls']:>6} calls"
            for p in r["profile"][:12]
        )
    return "\n".join(lines)


def _neighbour_table(name: str, r: dict[str, Any], order: int) -> str:
    lines = [
        f"\nneighbours  {r['model']}: {r['rounds']} rounds, ratios over AON K={order}",
        f"  {'':<26}{'fwd ms':>10}{'/AON':>7}{'fwd+bwd ms':>12}{'/AON':>7}",
    ]
    for key, row in r["rows"].items():
        f, b = row["fwd"], row["fwd+bwd"]
        back = f"{b['ms']:>12.2f}{b['over_aon']:>7.2f}" if b else f"{'-':>12}{'-':>7}"
        lines.append(f"  {key:<26}{f['ms']:>10.2f}{f['over_aon']:>7.2f}{back}")
    for key, why in r["skipped"].items():
        lines.append(f"  {key:<26} skipped: {why}")
    return "\n".join(lines)


def _memory_table(name: str, r: dict[str, Any]) -> str:
    cells = ", ".join(f"{k} x{v['over_params']:.2f}" for k, v in r["rows"].items())
    return f"\nmemory  peak extra of fwd+bwd over the weights' {r['param_bytes'] / 2**20:.1f} MiB: {cells}"


def _targets(res: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a = res["apply"].get("resnet18")
    if a is not None:
        auto = a["rows"][a["auto"]]
        vals = {
            "fwd_over_roofline": auto["fwd"]["over_roofline"],
            "fwd_over_kernel_loop": auto["fwd"]["over_kernel_loop"],
            "fwd+bwd_over_roofline": auto["fwd+bwd"]["over_roofline"],
        }
        out.update(
            {k: {"value": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in vals.items()}
        )
    s = res["step"].get("resnet18")
    if s is not None:
        v = s["overhead"]
        out["step_overhead"] = {
            "value": v,
            "target": TARGETS["step_overhead"],
            "met": v <= TARGETS["step_overhead"],
        }
    mem = res["memory"].get("resnet18")
    if mem is not None:
        v = max(row["over_params"] for k, row in mem["rows"].items() if k.endswith("auto"))
        out["memory_over_params"] = {
            "value": v,
            "target": TARGETS["memory_over_params"],
            "met": v <= TARGETS["memory_over_params"],
        }
    notes = []
    if cfg.order != 2:
        notes.append(f"measured at K = {cfg.order}; the targets are for K = 2")
    if cfg.matmul_dtype is not None:
        notes.append(f"measured with {cfg.matmul_dtype} products; the targets are for float32")
    for v in out.values() if notes else ():
        v["note"] = "; ".join(notes)
    return out

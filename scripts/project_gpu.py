"""Project ``AON.apply`` on a GPU from what can be measured without one (a projection, not a timing).

For each weight-shape set of ``aon-func bench`` it measures on the ``meta``
device (nothing is computed; the accelerator code path runs):

- the host work: top-level ATen calls of ``apply`` forward, and forward plus
  the backward of ``sum((w * c).sum())`` (the method of the GPU issue's
  counting tool), and how many of them launch a kernel (views left out);
- the plan: the buckets, and the FLOPs of their padded matrices against
  the FLOPs of the products themselves (the roofline's).

It then projects the time of one forward on a GPU with stated constants:
``HOST_US`` microseconds of host time per ATen call, ``LAUNCH_US`` of device
time per launched kernel beyond its arithmetic, and the GPU's matrix rate,
taken from the measured float32 roofline of ResNet-50 on an H200 (2.1 ms for
this script's roofline FLOPs: the GPU issue's figure). The host runs ahead
of the device (no synchronisation inside ``apply``), so the forward takes
about ``max(host, device)``; ``host + device`` bounds it from above.

    python scripts/project_gpu.py
    python scripts/project_gpu.py --host-us 10 --order 1
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from aon_func import AON
from aon_func._bench._models import MODELS
from aon_func._bench._suite import _flops, _model_params, roofline_products
from aon_func._plan import flops_per_matrix

VIEWS = {
    "reshape", "view", "slice", "unbind", "mT", "as_strided", "unsqueeze", "squeeze",
    "diagonal", "split_with_sizes", "split", "expand", "select", "transpose", "t",
    "movedim", "permute", "alias", "detach", "narrow", "unflatten", "flatten", "view_as",
    "expand_as", "lift_fresh", "_unsafe_view", "numpy_T", "matrix_H", "mH", "T",
}  # fmt: skip
"""ATen calls that make a view and launch nothing."""

RESNET50_ROOFLINE_MS = 2.1
"""ResNet-50 shapes, float32, K = 2, H200: the products of one forward (the GPU issue's figure)."""


def _calls(fn: object) -> collections.Counter[str]:
    fn()  # type: ignore[operator]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    return collections.Counter(
        e.name.removeprefix("aten::")
        for e in prof.events()
        if e.name.startswith("aten::")
        and not e.name.startswith("aten::empty")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def measure(name: str, order: int) -> dict[str, float | str]:
    meta = torch.device("meta")
    params, out_axes, layouts = _model_params(name, meta, torch.float32)
    tr = AON(include=frozenset(params), out_axes=out_axes, order=order)
    state = {n: torch.ones(lay.matrix_shape[0], device=meta) for n, lay in layouts.items()}
    cots = {n: torch.zeros_like(p) for n, p in params.items()}

    def fwd() -> None:
        tr.apply(params, state)

    def fwdbwd() -> None:
        ws, _ = tr.apply(params, state)
        total = sum((ws[n] * cots[n]).sum() for n in cots)
        torch.autograd.grad(total, list(params.values()))

    f, fb = _calls(fwd), _calls(fwdbwd)
    loop = AON(include=frozenset(params), out_axes=out_axes, order=order, batching="loop")
    f_loop = _calls(lambda: loop.apply(params, state))
    plan = tr.plan(params, state)
    per = flops_per_matrix(order)
    padded = sum(b.size * per(b.k, b.n) for b in plan.buckets)
    exact = sum(per(*lay.matrix_shape) for lay in layouts.values())
    return {
        "fwd": sum(f.values()),
        "fwd+bwd": sum(fb.values()),
        "launches": sum(v for k, v in f.items() if k not in VIEWS),
        "loop_fwd": sum(f_loop.values()),
        "loop_launches": sum(v for k, v in f_loop.items() if k not in VIEWS),
        "buckets": len(plan.buckets),
        "matrices": len(layouts),
        "roofline_flop": _flops(roofline_products(layouts, order, backward=False)),
        "padded_over_exact": padded / exact,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,resnet18,resnet50,vit_s16,gpt2,llama1b")
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--host-us", type=float, default=6.0, help="host time per ATen call")
    ap.add_argument("--launch-us", type=float, default=2.0, help="device time per launch")
    args = ap.parse_args()
    rows = {m: measure(m, args.order) for m in args.models.split(",")}
    ref = rows.get("resnet50") or measure("resnet50", args.order)
    rate = float(ref["roofline_flop"]) / (RESNET50_ROOFLINE_MS * 1e-3)  # FLOP/s
    print(
        f"K = {args.order}; {args.host_us:g} us host per ATen call, {args.launch_us:g} us per "
        f"launch, {rate / 1e12:.1f} TFLOP/s (ResNet-50 roofline {RESNET50_ROOFLINE_MS} ms)\n"
    )
    print(
        "| shapes | matrices | buckets | ATen fwd | ATen fwd+bwd | launches fwd | "
        "padded / exact FLOPs | roofline ms | projected fwd ms | / roofline | upper bound | "
        "loop ATen fwd | loop / auto |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        roof = float(r["roofline_flop"]) / rate
        device = roof * float(r["padded_over_exact"]) + float(r["launches"]) * args.launch_us * 1e-6
        host = float(r["fwd"]) * args.host_us * 1e-6
        proj, upper = max(host, device), host + device
        loop_device = roof + float(r["loop_launches"]) * args.launch_us * 1e-6
        loop = max(float(r["loop_fwd"]) * args.host_us * 1e-6, loop_device)
        print(
            f"| {name} | {r['matrices']} | {r['buckets']} | {r['fwd']} | {r['fwd+bwd']} | "
            f"{r['launches']} | {float(r['padded_over_exact']):.2f} | {1e3 * roof:.2f} | "
            f"{1e3 * proj:.2f} | {proj / roof:.2f} | {upper / roof:.2f} | "
            f"{r['loop_fwd']} | {loop / proj:.1f} |"
        )
    print("\n(models: " + "; ".join(f"{m}: {MODELS[m].description}" for m in rows) + ")")


if __name__ == "__main__":
    main()

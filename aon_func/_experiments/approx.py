"""How far AON is from orthonormal on trained layers, against its order ``K``.

For one weight, and each order ``K`` of ``orders``, :func:`approximation_errors`
gives the actual ``||h h^T - I||_2`` (short side of the matrix view) and
``||h - U V^T||_2`` of ``h = aon_func.aon(W, order=K)`` with a converged
power iteration, next to the bound ``aon_func.certified_error(kappa, K)``
for the weight's condition number ``kappa``. :func:`from_results` applies it
to the trained raw weights of the AON runs of a results folder
(``aon-func approx DIR``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import aon, certified_error, polar

__all__ = ["POWER_ITERATIONS", "approximation_errors", "from_results", "markdown"]

POWER_ITERATIONS = 500
"""Power-iteration steps of the stateless ``aon`` call: enough to converge on these layers."""


def _short_gram(z: Tensor) -> Tensor:
    return z @ z.mT if z.shape[0] <= z.shape[1] else z.mT @ z


def approximation_errors(
    weight: Tensor, *, out_axis: int = 0, orders: Iterable[int] = range(17)
) -> dict[str, Any]:
    """``kappa`` and, per order, the actual errors of AON and the certified one (float64)."""
    w = weight.detach().to(torch.float64).cpu()
    z = w.movedim(out_axis, 0).reshape(w.shape[out_axis], -1)
    s = torch.linalg.svdvals(z)
    kappa = float(s[0] / s[-1]) if float(s[-1]) > 0 else float("inf")
    q = polar(w, out_axis=out_axis).movedim(out_axis, 0).reshape(z.shape)
    eye = torch.eye(min(z.shape), dtype=torch.float64)
    rows = []
    for k in orders:
        h, _ = aon(w, order=k, n_power_iterations=POWER_ITERATIONS, out_axis=out_axis)
        hz = h.movedim(out_axis, 0).reshape(z.shape)
        rows.append(
            {
                "order": k,
                "ortho_2": float(torch.linalg.matrix_norm(_short_gram(hz) - eye, ord=2)),
                "polar_2": float(torch.linalg.matrix_norm(hz - q, ord=2)),
                "certified": float(certified_error(kappa, k)),
            }
        )
    return {"kappa": kappa, "orders": rows}


def from_results(folder: Path, orders: Iterable[int] = range(17)) -> list[dict[str, Any]]:
    """For the first reported run of every AON method (``aon``, ``aon-K``, K >= 1) in
    ``folder/results.json``: :func:`approximation_errors` of each of its normalised layers,
    from the raw weights of its checkpoint."""
    from .checkpoint import load_checkpoint

    res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    orders = list(orders)
    out = []
    for name, m in res["methods"].items():
        if not m["runs"]:
            continue
        run = min(m["runs"], key=lambda r: r["seed"])
        concrete = run["config"]["method"]
        if not re.fullmatch(r"aon-[1-9]\d*(@\d+)?", concrete) or "checkpoint" not in run:
            continue
        path = folder / run["checkpoint"]
        if not path.is_file():  # e.g. an --extend archive, whose runs were trained on
            print(
                f"aon-func approx: {name} seed {run['seed']}: checkpoint {run['checkpoint']} "
                "not found; skipped",
                file=sys.stderr,
            )
            continue
        params = load_checkpoint(path)["params"]
        for layer in sorted(run["ortho_error_per_layer"]):
            out.append(
                {
                    "method": name,
                    "trained_with": concrete,
                    "seed": run["seed"],
                    "layer": layer,
                    **approximation_errors(params[layer], orders=orders),
                }
            )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per layer: K, actual ``||h h^T - I||_2``, ``||h - U V^T||_2``, certified."""
    parts = []
    for r in rows:
        lines = [
            f"{r['method']} (trained as {r['trained_with']}, seed {r['seed']}), {r['layer']}: "
            f"condition number {r['kappa']:.1f}",
            "",
            "| K | ‖h hᵀ − I‖₂ | ‖h − U Vᵀ‖₂ | certified |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {o['order']} | {o['ortho_2']:.4f} | {o['polar_2']:.4f} | {o['certified']:.4f} |"
            for o in r["orders"]
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "no trained AON run (aon or aon-K, K >= 1) found"

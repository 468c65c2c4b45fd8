"""The study protocol: the tuning grid of each method, selection on validation, the
reference methods, the paired comparisons, and the provenance of a results file.

- :func:`grid`: the configurations one method is tried with under ``--tune``:
  the learning rates, times the method's own tunable value (AON's order for
  ``aon``/``aon-fro``, the penalty weight for ``soft``/``srip``, the decay for
  ``wd``; a name that fixes it, such as ``aon-2``, is not tuned), times the
  head/gain policies for the normalising methods. At most 3 x 3 x 2 with the
  default grids.
- :func:`select`: the configuration of the highest mean validation accuracy
  over the tuning seeds (the first in grid order on a tie).
- :func:`references` and :func:`pairs`: every method against ``plain`` and
  against the best orthonormal regulariser by validation.
- :func:`provenance`: the commit and the machine.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .methods import Method

__all__ = [
    "DEFAULT_TUNE",
    "GridPoint",
    "TuneGrid",
    "commit",
    "grid",
    "machine",
    "pairs",
    "references",
    "select",
]


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One configuration: the concrete method, the learning rate, the head/gain policy."""

    method: Method
    lr: float
    normalise_head: bool
    gain: str

    def key(self) -> str:
        """A name for the configuration's checkpoint folder."""
        head = "head" if self.normalise_head else "free"
        return f"{self.method.name}_lr{self.lr:g}_{head}_{self.gain}"

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON."""
        return {
            "method": self.method.name,
            "lr": self.lr,
            "normalise_head": self.normalise_head,
            "gain": self.gain,
        }


@dataclasses.dataclass(frozen=True)
class TuneGrid:
    """The values ``--tune`` tries (each a tuple, in order)."""

    lrs: tuple[float, ...]
    lambdas: tuple[float, ...]
    decays: tuple[float, ...]
    orders: tuple[int, ...]
    scales: tuple[tuple[bool, str], ...]
    """``(normalise_head, gain)`` policies, for the normalising methods only."""


DEFAULT_TUNE = TuneGrid(
    lrs=(3e-3, 1e-2, 3e-2),
    lambdas=(1e-4, 1e-3, 1e-2),
    decays=(1e-2, 1e-1, 1.0),
    orders=(1, 2, 4),
    scales=((False, "learnable"), (True, "learnable")),
)


def grid(method: Method, tune: TuneGrid) -> list[GridPoint]:
    """The configurations ``method`` is tried with, in order (learning rate outermost)."""
    from .methods import with_value

    if method.tunable and method.family in ("aon", "aon-fro"):
        variants = [with_value(method, k) for k in tune.orders]
    elif method.tunable and method.family in ("soft", "srip"):
        variants = [with_value(method, lam) for lam in tune.lambdas]
    elif method.tunable and method.family == "wd":
        variants = [with_value(method, d) for d in tune.decays]
    else:
        variants = [method]
    # only the normalisations have a gain; the penalties act on the free-head layers
    scales = tune.scales if method.kind == "normalise" else ((False, "learnable"),)
    return [
        GridPoint(v, lr, head, gain) for lr in tune.lrs for v in variants for head, gain in scales
    ]


def select(scores: Sequence[Sequence[float]]) -> int:
    """The index of the configuration with the highest mean validation accuracy (first on ties)."""
    if not scores:
        raise ValueError("no configuration to select from")
    means = [statistics.fmean(s) for s in scores]
    return max(range(len(means)), key=lambda i: (means[i], -i))


def references(methods: Sequence[Method], val_acc: Mapping[str, float]) -> list[str]:
    """``plain`` (if run) and the orthonormal regulariser (``soft``/``srip``) of the highest
    validation accuracy ``val_acc[name]`` (if any was run)."""
    refs = [m.name for m in methods if m.family == "plain"]
    regs = [m.name for m in methods if m.kind == "penalty"]
    if regs:
        refs.append(max(regs, key=lambda n: (val_acc[n], -regs.index(n))))
    return refs


def pairs(names: Sequence[str], refs: Sequence[str]) -> list[tuple[str, str]]:
    """``(a, b)`` for every reference ``b`` and every other method ``a`` (each pair once)."""
    out: list[tuple[str, str]] = []
    for b in refs:
        for a in names:
            if a != b and (b, a) not in out:
                out.append((a, b))
    return out


def commit() -> str:
    """``git rev-parse HEAD`` of the checkout this package runs from; ``"unknown"`` otherwise
    (not in a checkout, no git, or a checkout of something else around an installed copy)."""
    package = Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or len(lines[1]) != 40:
        return "unknown"
    if Path(lines[0]).resolve() / package.name != package:
        return "unknown"
    return lines[1]


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    """What ran the study: platform, processor, core count, Python, torch, threads, device."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

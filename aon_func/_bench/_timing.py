"""Side-by-side timing: interleaved repetitions, medians after warm-up, paired ratios."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "Timings",
    "count_calls",
    "machine",
    "peak_extra_bytes",
    "quiet_profiler",
    "synchronize",
    "time_interleaved",
]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """Seconds per repetition of each named callable, measured round by round.

    Round ``r`` ran every callable once, so ``ratio(a, b)`` is the median of
    the per-round ratios ``t_a / t_b``: both were measured under the same
    load, a few hundred milliseconds apart.
    """

    def __init__(self, rounds: list[dict[str, float]]) -> None:
        self.rounds = rounds

    def median(self, name: str) -> float:
        """Median seconds of ``name``."""
        return statistics.median(r[name] for r in self.rounds)

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of ``t_name / t_reference``."""
        return statistics.median(r[name] / r[reference] for r in self.rounds)

    def spread(self, name: str) -> float:
        """``(max - min) / median`` of ``name``: how noisy the machine was."""
        xs = [r[name] for r in self.rounds]
        return (max(xs) - min(xs)) / statistics.median(xs)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    budget_s: float | None = None,
    clock: str = "wall",
    min_rounds: int = 3,
) -> Timings:
    """Run every callable ``warmup`` times, then ``repeats`` interleaved rounds.

    Rounds alternate the order (ABC, CBA, ...) so a slow drift of the
    machine's load hits every callable alike. With ``budget_s``, rounds stop
    early (after at least ``min_rounds``) once the time spent would exceed it. ``clock``:
    ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``,
    the CPU seconds of all the process's threads: with one thread, the work
    done, nearly independent of other processes' load).
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        synchronize(device)
    rounds: list[dict[str, float]] = []
    start = time.perf_counter()
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        row: dict[str, float] = {}
        for name in order:
            synchronize(device)
            t0 = now()
            fns[name]()
            synchronize(device)
            row[name] = now() - t0
        rounds.append(row)
        spent = time.perf_counter() - start
        if budget_s is not None and r + 1 >= min_rounds and spent * (r + 2) / (r + 1) > budget_s:
            break
    return Timings(rounds)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it.

    CUDA: the caching allocator's peak statistics. CPU: the allocation and
    free events that ``torch.profiler`` records with ``profile_memory=True``
    (every tensor allocation through torch's CPU allocator, in time order),
    accumulated; ``tracemalloc`` would not see them, and the process RSS
    mixes in the allocator's caching and other threads. Scratch space that
    BLAS libraries allocate themselves is in neither.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events() if prof.profiler else []
    deltas = sorted((e.start_ns(), int(e.nbytes())) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Silence what the profiler's C++ side prints to the process's stderr (its start/stop lines).

    They are written to file descriptor 2 directly, past ``sys.stderr``; this
    points that descriptor at ``/dev/null`` for the block and restores it.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable descriptor 2: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_calls(fn: Callable[[], object], device: torch.device) -> dict[str, int | None]:
    """Host-side ATen calls of ``fn`` and, on CUDA, its kernel launches (second call of two).

    ``aten_calls``: ``torch.profiler`` CPU events named ``aten::*`` whose parent
    is not an ``aten::`` op, allocations (``aten::empty*``) left out: the
    operations Python dispatches, each a few microseconds of host time.
    ``kernels``: CUDA kernel events (``None`` off CUDA).
    """
    from torch.profiler import DeviceType, ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    synchronize(device)
    with quiet_profiler(), profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    aten = sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and not e.name.startswith("aten::empty")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    kernels = (
        sum(1 for e in events if e.device_type == DeviceType.CUDA)
        if device.type == "cuda"
        else None
    )
    return {"aten_calls": aten, "kernels": kernels}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "parallel_info": torch.__config__.parallel_info(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info

"""The planning engine: which matrices share one batched kernel call, and how to get them there.

A *plan* depends only on the transform and the structure of the input (names,
shapes, dtypes, devices), so it is computed once per structure and cached.
Applying it is a fixed sequence of tensor operations: per *group* of
identically laid-out tensors one ``torch.stack`` and a view into oriented
``(B, k, N)`` matrices; per *bucket* (one or more groups, zero-padded to a
common ``k x N``) one ``torch.cat`` and one call of the batched kernel; then
the same steps backwards. Zero padding is exact for AON, ONI and
Newton-Schulz (docs/algorithm.md, "Zero padding"), so groups of nearby
shapes can share a bucket; the SVD polar factor never pads.

Which groups share a bucket is decided by a cost model (``docs/performance.md``,
"The cost model"): per kernel call a fixed cost (launch and dispatch of its
operations), per FLOP of the padded matrices a cost, and per byte that
stacking copies a cost, with constants for the CPU and for accelerators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._kernel import start_vector
from ._layout import Layout

__all__ = [
    "COSTS",
    "Bucket",
    "CostModel",
    "Group",
    "Plan",
    "choose_buckets",
    "constants",
    "execute",
]


class CostModel(NamedTuple):
    """Seconds per kernel call, per FLOP and per byte copied (see ``docs/performance.md``)."""

    per_call: float
    per_flop: float
    per_byte: float


COSTS: dict[str, CostModel] = {
    # Fitted on the project's 2-core CPU, otherwise idle (scripts/fit_cost_model.py,
    # median relative error 0.13): a call of the batched kernel costs about 0.29 ms
    # of dispatch and small ops, a float32 FLOP 1 / (260 GFLOP/s), a byte stacked
    # about 1 / (3.6 GB/s).
    "cpu": CostModel(per_call=2.9e-4, per_flop=1.0 / 260e9, per_byte=1.0 / 3.6e9),
    # Accelerators (CUDA, and the meta device that stands in for one): a kernel
    # call issues about 50 launches at about 6 us each, float32 runs at about
    # 50 TFLOP/s and copies at about 3 TB/s (an H200's published figures, derated).
    "accelerator": CostModel(per_call=3e-4, per_flop=1.0 / 50e12, per_byte=1.0 / 3e12),
}


class Group(NamedTuple):
    """Tensors with one layout (shape and output axis), dtype and device: one ``torch.stack``."""

    names: tuple[str, ...]
    layout: Layout

    @property
    def k(self) -> int:
        return self.layout.matrix_shape[0]

    @property
    def n(self) -> int:
        return self.layout.matrix_shape[1]


class Bucket(NamedTuple):
    """Groups padded to one ``k x N`` and run by one kernel call.

    ``batched=False`` is a single matrix run without a batch axis (no copy).
    """

    groups: tuple[Group, ...]
    k: int
    n: int
    batched: bool
    dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def size(self) -> int:
        return sum(len(g.names) for g in self.groups)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.names)


class Plan(NamedTuple):
    """Everything :func:`execute` needs, computed from metadata alone."""

    selected: tuple[tuple[str, Layout], ...]
    buckets: tuple[Bucket, ...]
    gains: frozenset[str]
    """Names of the selected tensors that have a learnable gain in ``params``."""


Flops = Callable[[int, int], float]


def _bucket_cost(
    members: list[tuple[int, int, int]], costs: CostModel, flops: Flops, itemsize: int
) -> float:
    """Modelled time of one kernel call over ``members`` ``(count, k, N)``, padded to their maxima."""
    k = max(m[1] for m in members)
    n = max(m[2] for m in members)
    count = sum(m[0] for m in members)
    t = costs.per_call + count * flops(k, n) * costs.per_flop
    if count > 1:  # stacking copies every padded matrix, forward and backward
        t += 2 * count * k * n * itemsize * costs.per_byte
    return t


def choose_buckets(
    groups: list[Group],
    *,
    costs: CostModel,
    flops: Flops,
    itemsize: int,
    pad: bool,
    mode: str,
) -> list[tuple[list[Group], bool]]:
    """Partition ``groups`` into buckets: ``[(groups, batched), ...]``.

    ``mode="loop"``: every matrix alone. ``mode="vmap"``: one bucket per group.
    ``mode="auto"``: first each group is stacked or split into single
    matrices, whichever the model says is cheaper (stacking saves calls and
    costs a copy); then buckets are merged greedily, the pair that saves the
    most modelled time first, while a merge saves time (padding adds FLOPs,
    a merge saves a call). Without ``pad`` only groups of equal ``k x N`` merge.
    """
    if mode == "loop":
        return [([Group((name,), g.layout)], False) for g in groups for name in g.names]
    if mode == "vmap":
        return [([g], True) for g in groups]
    buckets: list[list[Group]] = []
    singles: list[tuple[list[Group], bool]] = []
    for g in groups:
        one = [(1, g.k, g.n)]
        alone = len(g.names) * _bucket_cost(one, costs, flops, itemsize)
        stacked = _bucket_cost([(len(g.names), g.k, g.n)], costs, flops, itemsize)
        if len(g.names) > 1 and stacked < alone:
            buckets.append([g])
        else:
            singles.extend(([Group((name,), g.layout)], False) for name in g.names)
    # Single matrices may still join a bucket: give them a chance as one-member buckets.
    buckets.extend(gs for gs, _ in singles)
    singles = []

    def members(gs: list[Group]) -> list[tuple[int, int, int]]:
        return [(len(g.names), g.k, g.n) for g in gs]

    def cost(gs: list[Group]) -> float:
        return _bucket_cost(members(gs), costs, flops, itemsize)

    def mergeable(a: list[Group], b: list[Group]) -> bool:
        # Zero padding only for maps that it commutes with.
        return pad or {(g.k, g.n) for g in a} == {(g.k, g.n) for g in b}

    current = [cost(b) for b in buckets]
    while True:
        best, pair = 0.0, (-1, -1)
        for i in range(len(buckets)):
            for j in range(i + 1, len(buckets)):
                if not mergeable(buckets[i], buckets[j]):
                    continue
                saving = current[i] + current[j] - cost(buckets[i] + buckets[j])
                if saving > best:
                    best, pair = saving, (i, j)
        if pair == (-1, -1):
            break
        i, j = pair
        merged = buckets[i] + buckets[j]
        buckets[i], current[i] = merged, cost(merged)
        del buckets[j], current[j]
    out: list[tuple[list[Group], bool]] = []
    for gs in buckets:
        single = len(gs) == 1 and len(gs[0].names) == 1
        out.append((gs, not single))
    return out


# ----------------------------------------------------------------------------- execution


def _orient(x: Tensor, layout: Layout, lead: int) -> Tensor:
    """``(lead..., *shape)`` -> oriented ``(lead..., k, N)`` (a view where possible)."""
    k, n = layout.matrix_shape
    if layout.out_axis != 0:
        x = torch.movedim(x, lead + layout.out_axis, lead)
    m, rest = (n, k) if layout.transposed else (k, n)
    x = x.reshape(*x.shape[:lead], m, rest)
    return x.mT if layout.transposed else x


def _unorient(h: Tensor, layout: Layout, lead: int, *, squeeze: bool = False) -> Tensor:
    """Inverse of :func:`_orient`; ``squeeze`` drops the ``lead`` axes (all of size 1) in the
    same reshape."""
    if layout.transposed:
        h = h.mT
    moved = (
        layout.shape[layout.out_axis],
        *(d for i, d in enumerate(layout.shape) if i != layout.out_axis),
    )
    if squeeze:
        h, lead = h.reshape(moved), 0
    else:
        h = h.reshape(*h.shape[:lead], *moved)
    if layout.out_axis != 0:
        h = torch.movedim(h, lead, lead + layout.out_axis)
    return h


def _gather(tensors: list[Tensor], layout: Layout, batched: bool) -> Tensor:
    if not batched:
        return _orient(tensors[0], layout, 0)
    if len(tensors) == 1 and layout.out_axis == 0:
        # One reshape adds the batch axis and makes the matrix view.
        k, n = layout.matrix_shape
        x = tensors[0].reshape(1, n, k) if layout.transposed else tensors[0].reshape(1, k, n)
        return x.mT if layout.transposed else x
    x = torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)
    return _orient(x, layout, 1)


def _pad(x: Tensor, k: int, n: int) -> Tensor:
    dk, dn = k - x.shape[-2], n - x.shape[-1]
    return F.pad(x, (0, dn, 0, dk)) if dk or dn else x


def _pad_vec(x: Tensor, k: int) -> Tensor:
    dk = k - x.shape[-1]
    return F.pad(x, (0, dk)) if dk else x


_CONSTANTS: dict[tuple[Bucket, torch.device], tuple[Tensor, Tensor]] = {}


def constants(bucket: Bucket, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(fallback, eye)`` for ``bucket``: start vectors ``(B, k)`` (or ``(k,)``) and ``I_k``.

    Cached per bucket and device in eager code (made outside any ``torch.func``
    transform, so a cached tensor never belongs to one); built inline under
    ``torch.compile``, where they become constants of the graph.
    """
    if torch.compiler.is_compiling():
        return _make_constants(bucket, device)
    key = (bucket, device)
    cached = _CONSTANTS.get(key)
    if cached is None:
        with torch._C._DisableFuncTorch():
            cached = _make_constants(bucket, device)
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        _CONSTANTS[key] = cached
    return cached


def _make_constants(bucket: Bucket, device: torch.device) -> tuple[Tensor, Tensor]:
    dtype = bucket.compute_dtype
    eye = torch.eye(bucket.k, dtype=dtype, device=device)
    if not bucket.batched:
        return start_vector(bucket.k, dtype, device), eye
    if all(g.k == bucket.k for g in bucket.groups):
        return start_vector(bucket.k, dtype, device).expand(bucket.size, bucket.k), eye
    parts = [
        _pad_vec(start_vector(g.k, dtype, device), bucket.k).expand(len(g.names), bucket.k)
        for g in bucket.groups
    ]
    return torch.cat(parts), eye  # each start vector padded with zeros, as its matrix


KernelFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, "Tensor | float | None"], tuple[Tensor, Tensor]
]
"""``(z, u, fallback, eye, gain) -> (h, u_new)`` over oriented stacks (or one matrix)."""


def _stack(tensors: list[Tensor], batched: bool) -> Tensor:
    if not batched:
        return tensors[0]
    return torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)


def _gather_bucket(
    b: Bucket,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor] | None,
) -> tuple[Tensor, Tensor | None]:
    """The bucket's oriented, padded, cast matrices ``(B, k, N)``, and its states ``(B, k)``."""
    zs = [
        _pad(_gather([params[n] for n in g.names], g.layout, b.batched), b.k, b.n) for g in b.groups
    ]
    z = zs[0] if len(zs) == 1 else torch.cat(zs)
    if z.dtype != b.compute_dtype:
        z = z.to(b.compute_dtype)
    if state is None:
        return z, None
    if all(g.k == b.k for g in b.groups):
        return z, _stack([state[n] for n in b.names], b.batched)
    us = [_pad_vec(_stack([state[n] for n in g.names], True), b.k) for g in b.groups]
    return z, torch.cat(us)


def _bucket_gain(
    b: Bucket,
    params: Mapping[str, Tensor],
    plan: Plan,
    gain: float | None,
    gain_key: Callable[[str], str],
) -> Tensor | float | None:
    """The fixed gain times the learnable ones, ``(B, 1, 1)`` (or 0-d unbatched), or ``None``."""
    names = b.names
    if not any(n in plan.gains for n in names):
        return gain
    device = params[names[0]].device
    one = torch.ones((), dtype=b.compute_dtype, device=device)
    gl = [params[gain_key(n)] if n in plan.gains else one for n in names]
    gt = _stack(gl, b.batched).to(b.compute_dtype)
    if b.batched:
        gt = gt.view(-1, 1, 1)
    return gt if gain is None else gt * gain


def _scatter_bucket(
    b: Bucket, h: Tensor, u_new: Tensor, weights: dict[str, Tensor], new_u: dict[str, Tensor]
) -> None:
    """Undo :func:`_gather_bucket`: one weight and one state per name."""
    if h.dtype != b.dtype:
        h = h.to(b.dtype)
    if not b.batched:
        grp = b.groups[0]
        weights[grp.names[0]] = _unorient(h, grp.layout, 0)
        new_u[grp.names[0]] = u_new
        return
    uniform_k = all(grp.k == b.k for grp in b.groups)
    if uniform_k:
        new_u.update(zip(b.names, u_new.unbind(0), strict=True))
    sizes = [len(grp.names) for grp in b.groups]
    hs = torch.split(h, sizes) if len(sizes) > 1 else (h,)
    us = torch.split(u_new, sizes) if len(sizes) > 1 and not uniform_k else (u_new,)
    for i, (grp, hg) in enumerate(zip(b.groups, hs, strict=True)):
        if grp.k != b.k:
            hg = hg[:, : grp.k, : grp.n]
        elif grp.n != b.n:
            hg = hg[..., : grp.n]
        if len(grp.names) > 1:
            weights.update(zip(grp.names, _unorient(hg, grp.layout, 1).unbind(0), strict=True))
        else:  # one reshape drops the batch axis and restores the shape
            weights[grp.names[0]] = _unorient(hg, grp.layout, 1, squeeze=True)
        if not uniform_k:
            ug = us[i][:, : grp.k] if grp.k != b.k else us[i]
            new_u.update(zip(grp.names, ug.unbind(0), strict=True))


def execute(
    plan: Plan,
    fn: KernelFn,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor] | None,
    *,
    gain: float | None,
    gain_key: Callable[[str], str],
    vmap: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run ``fn`` over the plan's buckets: ``(weights of the selected tensors, their new u)``.

    ``state`` is ``None`` for the stateless mode (and for stateless maps):
    the kernel then starts from the start vectors.
    """
    weights: dict[str, Tensor] = {}
    new_u: dict[str, Tensor] = {}
    for b in plan.buckets:
        z, u = _gather_bucket(b, params, state)
        fb, eye = constants(b, z.device)
        g = _bucket_gain(b, params, plan, gain, gain_key)
        if u is None:
            u = fb
        if vmap and b.batched:
            gin = 0 if isinstance(g, Tensor) else None
            h, u_new = torch.func.vmap(fn, in_dims=(0, 0, 0, None, gin))(z, u, fb, eye, g)
        else:
            h, u_new = fn(z, u, fb, eye, g)
        _scatter_bucket(b, h, u_new, weights, new_u)
    return weights, new_u


def flops_per_matrix(order: int) -> Flops:
    """Forward FLOPs of AON on one ``k x N`` matrix (the cost model's unit of work)."""

    def f(k: int, n: int) -> float:
        return 4.0 * k * k * n + 2.0 * max(order - 1, 0) * k**3 + 24.0 * k * k

    return f


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def cost_model_for(device: torch.device) -> CostModel:
    return COSTS["cpu"] if device.type == "cpu" else COSTS["accelerator"]

"""Paired statistics for the comparison: BCa bootstrap intervals, permutation tests, Holm's correction.

Two methods trained with the same seed see the same initial weights and the
same batches, so they are compared through their paired differences
``d_i = a_i - b_i`` (one per seed):

- :func:`bca_interval`: a 95% bias-corrected and accelerated (BCa) bootstrap
  interval of the mean difference (Efron 1987; 10,000 resamples by default);
- :func:`paired_permutation_p`: the two-sided p-value of the paired
  permutation (sign-flip) test of "no difference": exact (all ``2^n`` sign
  patterns) up to :data:`EXACT_UP_TO` seeds, Monte Carlo beyond;
- :func:`holm`: Holm's step-down adjustment of a family of p-values;
- :func:`compare`: all of them for a list of method pairs, with a verdict
  only when there are at least :data:`MIN_SEEDS_FOR_VERDICT` seeds.

Pure NumPy; deterministic for a given ``seed``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "ALPHA",
    "EXACT_UP_TO",
    "MIN_SEEDS_FOR_VERDICT",
    "SMOKE_TEST",
    "acceleration",
    "bca_interval",
    "compare",
    "holm",
    "paired_permutation_p",
    "verdict",
]

ALPHA = 0.05
"""Family-wise significance level of the comparisons (after Holm's correction)."""

EXACT_UP_TO = 12
"""Largest number of pairs for which the permutation test enumerates every sign pattern."""

MIN_SEEDS_FOR_VERDICT = 5
"""Fewer seeds than this: no verdict, only :data:`SMOKE_TEST`."""

SMOKE_TEST = "smoke test: too few seeds for a verdict"

_NORMAL = NormalDist()


def _as_array(diffs: Sequence[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(
            f"paired differences must be a non-empty 1-d sequence, got shape {d.shape}"
        )
    if not np.isfinite(d).all():
        raise ValueError("paired differences must be finite")
    return d


def acceleration(diffs: Sequence[float]) -> float:
    """BCa's acceleration from the jackknife means ``m_i`` (the mean without pair ``i``).

    ``a = sum (m - m_i)^3 / (6 (sum (m - m_i)^2)^(3/2))`` with ``m`` the mean
    of the ``m_i``; 0 when they are all equal.
    """
    d = _as_array(diffs)
    if d.size < 2:
        return 0.0
    jack = (d.sum() - d) / (d.size - 1)
    dev = jack.mean() - jack
    den = 6.0 * float((dev**2).sum()) ** 1.5
    return float((dev**3).sum()) / den if den > 0 else 0.0


def bca_interval(
    diffs: Sequence[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """BCa bootstrap interval of the mean of ``diffs`` at ``level``.

    ``z0 = Phi^-1(share of bootstrap means below the observed mean)`` (ties
    count half) corrects the bias; the acceleration
    ``a = sum (m - m_i)^3 / (6 (sum (m - m_i)^2)^(3/2))`` comes from the
    jackknife means ``m_i`` (each leaving one pair out). The endpoints are
    the bootstrap means' quantiles at ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))``
    for ``z = Phi^-1((1 -+ level) / 2)``. All differences equal: the interval
    is that value; a single pair: ``(d, d)``.
    """
    d = _as_array(diffs)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(d.mean())
    if d.size == 1 or np.all(d == d[0]):
        return mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(axis=1)
    share = (np.count_nonzero(boot < mean) + 0.5 * np.count_nonzero(boot == mean)) / resamples
    below = min(max(float(share), 0.5 / resamples), 1.0 - 0.5 / resamples)
    z0 = _NORMAL.inv_cdf(below)
    a = acceleration(d.tolist())
    ends = []
    for tail in ((1.0 - level) / 2.0, (1.0 + level) / 2.0):
        z = _NORMAL.inv_cdf(tail)
        q = _NORMAL.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
        ends.append(float(np.quantile(boot, q)))
    return ends[0], ends[1]


def paired_permutation_p(
    diffs: Sequence[float], *, resamples: int = 100_000, seed: int = 0
) -> float:
    """Two-sided p-value of the paired sign-flip test: ``P(|mean(s d)| >= |mean(d)|)``.

    Under "no difference" each pair's sign is equally likely either way. Up
    to :data:`EXACT_UP_TO` pairs every one of the ``2^n`` sign patterns is
    counted (the observed one included); beyond, ``resamples`` random ones
    (and the observed), so ``p > 0`` always.
    """
    d = _as_array(diffs)
    observed = abs(float(d.mean()))
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        means = np.abs(signs @ d) / d.size
        return float(np.count_nonzero(means >= observed - tol)) / len(signs)
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(resamples, d.size))
    means = np.abs(signs @ d) / d.size
    return float(np.count_nonzero(means >= observed - tol) + 1) / (resamples + 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order.

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted value is at most ``alpha`` controls the
    family-wise error rate at ``alpha``.
    """
    p = [float(x) for x in pvalues]
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"p-values must be in [0, 1], got {p}")
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def compare(
    scores: Mapping[str, Sequence[float]],
    pairs: Sequence[tuple[str, str]],
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``a`` against ``b`` for each pair: paired by position (seed), Holm across the pairs.

    ``scores[name]`` holds one score per seed, in the same seed order for
    every method. Each comparison: ``a``, ``b``, ``n``, ``diff_mean``,
    ``ci95`` (BCa), ``p`` (permutation), ``p_holm`` and ``significant``
    (``p_holm <= ALPHA``; ``None`` with fewer than
    :data:`MIN_SEEDS_FOR_VERDICT` seeds).
    """
    rows: list[dict[str, Any]] = []
    for a, b in pairs:
        xa, xb = list(scores[a]), list(scores[b])
        if len(xa) != len(xb):
            raise ValueError(f"{a} has {len(xa)} seeds and {b} {len(xb)}: pairs need both")
        d = [x - y for x, y in zip(xa, xb, strict=True)]
        lo, hi = bca_interval(d, resamples=resamples, seed=seed)
        rows.append(
            {
                "a": a,
                "b": b,
                "n": len(d),
                "diff_mean": float(np.mean(d)),
                "ci95": [lo, hi],
                "p": paired_permutation_p(d, seed=seed),
            }
        )
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
        row["significant"] = adjusted <= ALPHA if row["n"] >= MIN_SEEDS_FOR_VERDICT else None
    return rows


def verdict(row: Mapping[str, Any], *, unit: str = "points", scale: float = 100.0) -> str:
    """One sentence for one comparison (accuracies as fractions, shown in percentage points)."""
    if row["significant"] is None:
        return f"{row['a']} vs {row['b']}: {SMOKE_TEST} ({row['n']} seeds)."
    lo, hi = (scale * x for x in row["ci95"])
    diff = scale * row["diff_mean"]
    where = "better" if diff > 0 else "worse"
    stats = f"{diff:+.2f} {unit} (95% CI {lo:+.2f} to {hi:+.2f}; p = {row['p']:.3g}, Holm {row['p_holm']:.3g})"
    if row["significant"]:
        return f"{row['a']} is {where} than {row['b']}: {stats}."
    return f"{row['a']} vs {row['b']}: no significant difference, {stats}."

"""The comparison's statistics against hand-computed examples (and SciPy's BCa where present)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aon_func._experiments import stats


def test_permutation_p_is_exact_on_small_examples() -> None:
    # [1, 2, 3]: of the 8 sign patterns only (+++) and (---) reach |mean| = 2.
    assert stats.paired_permutation_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # five positive differences: 2 of 32 patterns.
    assert stats.paired_permutation_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # a mean of zero is reached or exceeded by every pattern.
    assert stats.paired_permutation_p([1.0, -1.0]) == 1.0
    # [3, 1, -1], |sum| = 3: the patterns' |sums| are 5, 3, 3 and 1, each twice: 6 of 8.
    assert stats.paired_permutation_p([3.0, 1.0, -1.0]) == pytest.approx(6 / 8)


def test_permutation_p_is_monte_carlo_beyond_twelve_pairs() -> None:
    d = [0.01 * (i + 1) for i in range(20)]  # all positive: exact p = 2 / 2^20
    p = stats.paired_permutation_p(d, resamples=20_000)
    assert 0 < p <= 3 / 20_001


def test_holm_by_hand() -> None:
    # sorted: 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, then max(0.06, 0.04 * 1) = 0.06.
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match="p-values"):
        stats.holm([1.5])


def test_acceleration_by_hand() -> None:
    # d = [0, 0, 0, 1]: jackknife means 1/3 (x3) and 0, mean 1/4;
    # deviations -1/12 (x3) and 1/4: sum^3 = 1/72, sum^2 = 1/12.
    expected = (1 / 72) / (6 * (1 / 12) ** 1.5)
    assert stats.acceleration([0.0, 0.0, 0.0, 1.0]) == pytest.approx(expected)
    assert expected == pytest.approx(0.0962250, abs=1e-7)
    assert stats.acceleration([1.0, 2.0, 3.0]) == pytest.approx(0.0)  # symmetric


def test_bca_interval_degenerate_and_basic_cases() -> None:
    assert stats.bca_interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    assert stats.bca_interval([0.2]) == (0.2, 0.2)
    lo, hi = stats.bca_interval([0.01, 0.02, 0.03, 0.05, 0.04, 0.02, 0.03, 0.01, 0.06, 0.03])
    assert 0.01 < lo < 0.029 < hi < 0.05  # around the mean, 0.03
    with pytest.raises(ValueError, match="finite"):
        stats.bca_interval([1.0, math.nan])


def test_bca_interval_agrees_with_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats", reason="SciPy is not installed")
    rng = np.random.default_rng(3)
    d = rng.exponential(0.02, size=10) - 0.005  # skewed: BCa differs from the percentile method
    ours = stats.bca_interval(list(d), resamples=40_000)
    ref = scipy_stats.bootstrap(
        (d,), np.mean, method="BCa", n_resamples=40_000, random_state=np.random.default_rng(0)
    ).confidence_interval
    spread = float(d.max() - d.min())
    assert ours[0] == pytest.approx(ref.low, abs=0.03 * spread)
    assert ours[1] == pytest.approx(ref.high, abs=0.03 * spread)


def test_compare_pairs_by_seed_and_withholds_a_verdict_below_five_seeds() -> None:
    scores = {
        "aon-1": [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96],
        "plain": [0.80, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86],
        "soft": [0.905, 0.905, 0.925, 0.925, 0.945, 0.945, 0.96],
    }
    rows = stats.compare(scores, [("aon-1", "plain"), ("aon-1", "soft")])
    first, second = rows
    assert first["diff_mean"] == pytest.approx(0.10)
    assert first["ci95"] == [pytest.approx(0.10), pytest.approx(0.10)]
    assert first["p"] == pytest.approx(2 / 128)  # 7 positive differences
    assert first["p_holm"] == pytest.approx(2 * 2 / 128)  # the smaller of two p-values, x2
    assert first["significant"] is True
    assert second["diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert second["significant"] is False
    assert "is better than plain" in stats.verdict(first)
    assert "no significant difference" in stats.verdict(second)
    # Six seeds: the exact test's smallest p is 2/64, and Holm doubles it past 0.05.
    six = stats.compare(
        {k: v[:6] for k, v in scores.items()}, [("aon-1", "plain"), ("aon-1", "soft")]
    )
    assert six[0]["p_holm"] == pytest.approx(2 * 2 / 64)
    assert six[0]["significant"] is False
    few = stats.compare({k: v[:4] for k, v in scores.items()}, [("aon-1", "plain")])
    assert few[0]["significant"] is None
    assert stats.SMOKE_TEST in stats.verdict(few[0])
    with pytest.raises(ValueError, match="seeds"):
        stats.compare({"a": [1.0], "b": [1.0, 2.0]}, [("a", "b")])

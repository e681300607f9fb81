"""Chi-square with sparse cells pooled (Cochran's rule, judged on the reference's counts) against a naive pooling +
scipy, and the nominal level of chi-square and the binned KS at small windows and for rare categories."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmirror.kernels import chi_square, ks, quantile_edges
from mlmirror.kernels.methods import CHI2_MIN_EXPECTED, DRIFT_METHODS
from scipy import stats


def ref_pooled_chi_square(reference: np.ndarray, current: np.ndarray, min_expected: float) -> tuple[float, int, float]:
    """The definition, step by step: a column's size is ``min(N, M) * max(ref / N, total / (N + M))``; in
    increasing order of size, columns join one pool while the pool's size or their own is below ``min_expected``;
    then scipy on the coarser table."""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    n, m = reference.sum(), current.sum()

    def size(ref: float, cur: float) -> float:
        return min(n, m) * max(ref / n, (ref + cur) / (n + m))

    columns: list[tuple[float, float]] = []
    pool: list[tuple[float, float]] = []
    for k in sorted(range(len(reference)), key=lambda k: (size(reference[k], current[k]), k)):
        if reference[k] + current[k] == 0:
            continue
        pooled = (sum(r for r, _ in pool), sum(c for _, c in pool))
        if (pool and size(*pooled) < min_expected) or size(reference[k], current[k]) < min_expected:
            pool.append((reference[k], current[k]))
        else:
            columns.append((reference[k], current[k]))
    if pool:
        columns.append((sum(r for r, _ in pool), sum(c for _, c in pool)))
    if len(columns) < 2:
        return (0.0 if len(columns) == 1 else math.nan), 0, 1.0
    table = np.array(columns).T
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), int(result.dof), float(result.pvalue)


def test_pooling_by_hand():
    # Reference shares 70 / 25 / 4 / 1 %, a window of 100: expected 70, 25, 4, 1 -> the last two are pooled (5).
    reference = np.array([700.0, 250.0, 40.0, 10.0, 0.0])
    current = np.array([60.0, 30.0, 6.0, 3.0, 1.0])  # one unknown category (reference 0): pooled too
    statistic, dof, p = chi_square(reference, current, 5.0)
    table = np.array([[700.0, 250.0, 50.0], [60.0, 30.0, 10.0]])
    want = stats.chi2_contingency(table, correction=False)
    assert dof[0] == 2
    assert statistic[0] == pytest.approx(want.statistic, rel=1e-12)
    assert p[0] == pytest.approx(want.pvalue, rel=1e-9)
    # Without pooling, all five columns count (as scipy on the raw table).
    assert chi_square(reference, current)[1][0] == 4


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 60)), min_size=1, max_size=14),
    st.sampled_from([0.0, 1.0, 5.0, 10.0]),
)
def test_pooled_chi_square_matches_the_naive_pooling_and_scipy(cells, min_expected):
    reference = np.array([float(r) for r, _ in cells])
    current = np.array([float(c) for _, c in cells])
    if reference.sum() == 0 or current.sum() == 0:
        assert math.isnan(chi_square(reference, current, min_expected)[2][0])
        return
    statistic, dof, p = chi_square(reference, current, min_expected)
    want_statistic, want_dof, want_p = ref_pooled_chi_square(reference, current, min_expected)
    assert dof[0] == want_dof
    if want_dof > 0:
        assert statistic[0] == pytest.approx(want_statistic, rel=1e-9, abs=1e-12)
        assert p[0] == pytest.approx(want_p, rel=1e-7, abs=1e-300)
    else:
        assert p[0] == 1.0


def test_pooling_threshold_is_checked():
    with pytest.raises(ValueError, match="min_expected"):
        chi_square(np.ones(3), np.ones(3), -1.0)
    with pytest.raises(ValueError, match="min_expected"):
        chi_square(np.ones(3), np.ones(3), math.nan)


def test_the_registry_pools_at_cochrans_five():
    reference = np.array([[700.0, 250.0, 40.0, 10.0]])
    current = np.array([[60.0, 30.0, 6.0, 4.0]])
    got = DRIFT_METHODS["chi2"].score(reference, current, None)
    assert CHI2_MIN_EXPECTED == 5.0
    assert got[0] == pytest.approx(chi_square(reference, current, 5.0)[2][0])
    assert got[0] != pytest.approx(chi_square(reference, current)[2][0])


# --- the level at small windows and rare categories -----------------------------------------------------------------

TRIALS = 3000  # binomial sd of a 1% rate over 3000 trials: 0.18%; the bounds below are 3 sd and more above


def _numeric_null(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference of 2,000 rows in 10 quantile bins (+ under/overflow), windows of ``rows`` from the same law."""
    reference = np.empty((TRIALS, 12))
    current = np.empty((TRIALS, 12))
    for t in range(TRIALS):
        ref = rng.normal(size=2000)
        edges = quantile_edges(ref[:, None], 10)[0]
        slots = np.concatenate([[-np.inf], edges, [np.inf]])
        reference[t] = np.histogram(ref, slots)[0]
        current[t] = np.histogram(rng.normal(size=rows), slots)[0]
    return reference, current


@pytest.mark.parametrize("rows", [10, 50, 200])
def test_chi_square_and_binned_ks_keep_their_level_on_numeric_bins(rows):
    rng = np.random.default_rng(rows)
    reference, current = _numeric_null(rng, rows)
    chi2 = DRIFT_METHODS["chi2"].score(reference, current, None)
    ks_p = ks(reference, current)[1]
    assert (chi2 < 0.01).mean() <= 0.016, (chi2 < 0.01).mean()
    assert (ks_p < 0.01).mean() <= 0.016, (ks_p < 0.01).mean()
    # Without pooling, a window's few values beyond the reference's extremes (overflow, reference count 0) and
    # bins of 1 expected value inflate the statistic: the raw test is far above its level at 50 rows.
    if rows == 50:
        raw = chi_square(reference, current)[2]
        assert (raw < 0.01).mean() > 0.03


@pytest.mark.parametrize("rows", [20, 50, 200, 1000])
def test_chi_square_keeps_its_level_with_a_rare_category(rows):
    rng = np.random.default_rng(rows + 1)
    shares = np.array([0.7, 0.25, 0.045, 0.005, 0.0])  # the last slot: unknown categories
    reference = rng.multinomial(2000, shares, size=TRIALS).astype(float)
    current = rng.multinomial(rows, shares, size=TRIALS).astype(float)
    pooled = DRIFT_METHODS["chi2"].score(reference, current, None)
    assert (pooled < 0.01).mean() <= 0.016, (pooled < 0.01).mean()
    if rows <= 50:  # the 0.5% category's expected count is 0.25 or less: the raw test is over its level
        raw = chi_square(reference, current)[2]
        assert (raw < 0.01).mean() > 0.015


def test_a_category_the_reference_never_saw_stands_alone_when_it_is_common():
    # Red/blue 70/30 in the reference; the window swaps blue for a new colour: pooling it with blue would hide it.
    reference = np.array([3500.0, 1500.0, 0.0])
    current = np.array([700.0, 0.0, 300.0])
    statistic, dof, p = chi_square(reference, current, 5.0)
    assert dof[0] == 2
    assert p[0] < 1e-12
    # One unseen value is pooled (with blue), as it should: under no drift it happens.
    assert chi_square(reference, np.array([700.0, 299.0, 1.0]), 5.0)[1][0] == 1


def test_pooling_keeps_the_power_for_a_real_change():
    rng = np.random.default_rng(7)
    reference = rng.multinomial(2000, [0.7, 0.3], size=200).astype(float)
    current = rng.multinomial(1000, [0.6, 0.4], size=200).astype(float)
    p = DRIFT_METHODS["chi2"].score(reference, current, None)
    assert (p < 0.01 / 8).mean() > 0.95  # 70/30 -> 60/40 in 1,000 rows, even at a family's Bonferroni level

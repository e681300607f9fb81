"""Multivariate drift: the PCA reconstruction error from sums equals the error computed on rows, and a change in
the features' joint structure is flagged while no feature's own distribution moves."""

from __future__ import annotations

import numpy as np
from mlmirror.config import Drift, Multivariate, parse_config
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.multivariate import PcaDrift

from tests.support import feed_rows


def correlated(rng: np.random.Generator, rows: int, rho: float) -> np.ndarray:
    """Three standard-normal features; the first two with correlation ``rho``."""
    a = rng.normal(size=rows)
    b = rho * a + np.sqrt(1 - rho**2) * rng.normal(size=rows)
    return np.column_stack([a, b, rng.normal(size=rows)]) * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, -3.0])


def test_the_error_from_sums_equals_the_error_computed_on_rows():
    rng = np.random.default_rng(0)
    reference = correlated(rng, 5000, 0.9)
    pca = PcaDrift(reference, window_rows=1000, variance=0.65)
    window = correlated(rng, 1000, 0.3)
    state = pca.new_state()
    for chunk in np.array_split(window, 9):
        pca.add(state, chunk)
    z = (window - reference.mean(axis=0)) / reference.std(axis=0)
    projected = z @ pca.components @ pca.components.T
    expected = float(np.mean(np.sum((z - projected) ** 2, axis=1)))
    assert abs(pca.error(state) - expected) < 1e-9
    # Standardized eigenvalues ~ 1 + rho, 1, 1 - rho: the first explains 63% < 65%, so two components are kept.
    assert pca.components.shape == (3, 2)


def test_a_broken_correlation_is_flagged_while_every_feature_alone_is_steady():
    rng = np.random.default_rng(1)
    engine = DriftEngine("m", Drift(window=1000, capture=3000))
    feed_rows(engine, correlated(rng, 3000, 0.9))  # the reference
    feed_rows(engine, correlated(rng, 1000, 0.9))  # the same world
    steady = engine.latest["m", "1"]
    assert steady.multivariate is not None
    assert not steady.multivariate.drifted
    feed_rows(engine, correlated(rng, 1000, 0.0))  # the same marginals, the correlation gone
    broken = engine.latest["m", "1"]
    assert broken.index == 1
    assert broken.multivariate is not None
    assert broken.multivariate.drifted
    assert broken.multivariate.error > 2 * broken.multivariate.reference
    assert [s.name for s in broken.series if s.drifted] == []  # no univariate test sees it


def test_multivariate_settings():
    base = """
    upstreams: {a: 127.0.0.1:1}
    routes: [{match: {}, primary: a, drift: DRIFT}]
    """
    assert parse_config(base.replace("DRIFT", "{}")).routes[0].drift.multivariate == Multivariate()
    assert parse_config(base.replace("DRIFT", "{multivariate: off}")).routes[0].drift.multivariate is None
    custom = parse_config(base.replace("DRIFT", "{multivariate: {variance: 0.9, k: 4}}")).routes[0].drift
    assert custom.multivariate == Multivariate(variance=0.9, k=4.0)

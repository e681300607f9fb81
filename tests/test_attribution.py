"""Feature-attribution drift: the surrogate's importances against a least-squares fit, NDCG against its definition,
and detection when the model's reliance on a feature changes while its inputs stay the same."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlmirror.config import Attribution, Drift, parse_config
from mlmirror.errors import ConfigError
from mlmirror.observing.drift.attribution import AttributionTracker, ndcg
from mlmirror.observing.drift.engine import DriftEngine

from tests.support import feed_calls, fp64_call


def test_surrogate_importances_equal_standardized_least_squares_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([2.0, -1.0, 0.0])
    y = 1.5 * x[:, 0] - 0.2 * x[:, 1] + 4.0 * x[:, 2] + rng.normal(scale=0.3, size=3000)
    numeric = np.column_stack([x, y])
    tracker = AttributionTracker([0, 1, 2], [3], surrogate=True, threshold=0.9)
    state = tracker.new_state()
    for chunk in np.array_split(numeric, 7):  # sums merge across batches
        tracker.add(state, chunk)
    design = np.column_stack([np.ones(len(x)), x])
    beta = np.linalg.lstsq(design, y, rcond=None)[0][1:]
    expected = np.abs(beta) * x.std(axis=0) / y.std()
    np.testing.assert_allclose(tracker.importance(state), expected, rtol=1e-8)


def test_attribution_tensor_importances_are_mean_absolute_values():
    rng = np.random.default_rng(1)
    numeric = rng.normal(size=(500, 4))
    numeric[7, 2] = np.nan  # a row with a non-finite value is skipped
    tracker = AttributionTracker([0, 1], [2, 3], surrogate=False, threshold=0.9)
    state = tracker.new_state()
    tracker.add(state, numeric)
    keep = np.isfinite(numeric[:, 2:]).all(axis=1)
    np.testing.assert_allclose(tracker.importance(state), np.abs(numeric[keep, 2:]).mean(axis=0))


def dcg(relevance_in_order: list[float]) -> float:
    return sum(r / math.log2(i + 2) for i, r in enumerate(relevance_in_order))


def test_ndcg_follows_its_definition():
    reference = np.array([0.5, 0.3, 0.15, 0.05])
    assert ndcg(reference, reference) == 1.0
    assert ndcg(reference, reference * 7) == 1.0  # only the ranking counts
    swapped = np.array([0.3, 0.5, 0.15, 0.05])
    assert ndcg(reference, swapped) == pytest.approx(dcg([0.3, 0.5, 0.15, 0.05]) / dcg([0.5, 0.3, 0.15, 0.05]))
    reversed_ranking = reference[::-1].copy()
    assert ndcg(reference, reversed_ranking) == pytest.approx(dcg([0.05, 0.15, 0.3, 0.5]) / dcg([0.5, 0.3, 0.15, 0.05]))
    assert math.isnan(ndcg(reference, np.array([1.0, np.nan, 0.0, 0.0])))
    assert math.isnan(ndcg(np.zeros(4), reference))


def feed(engine: DriftEngine, rng: np.random.Generator, calls: int, weights: np.ndarray) -> None:
    """``calls`` calls of 3 standard-normal features answered with ``score = x @ weights + noise``."""

    def make(x: np.ndarray):
        return fp64_call(x, [("score", (x @ weights + rng.normal(scale=0.1, size=1)))])

    feed_calls(engine, (make(rng.normal(size=(1, 3))) for _ in range(calls)))


def test_a_change_in_reliance_is_flagged_while_the_inputs_do_not_drift():
    rng = np.random.default_rng(2)
    engine = DriftEngine("m", Drift(window=1000, capture=2000, attribution=Attribution()))
    before = np.array([3.0, 1.0, 0.2])  # the model leans on input[0], then input[1]
    after = np.array([0.2, 1.0, 3.0])  # ...and now on input[2]
    feed(engine, rng, 2000 + 1000, before)
    steady = engine.latest["m", "1"]
    assert steady.attribution is not None
    assert not steady.attribution.drifted
    assert steady.attribution.ndcg > 0.99
    feed(engine, rng, 1000, after)
    changed = engine.latest["m", "1"]
    assert changed.index == 1
    assert changed.attribution is not None
    assert changed.attribution.drifted
    assert changed.attribution.ndcg < 0.9
    importance = changed.attribution.importance
    assert max(importance, key=importance.get) == "input[2]"
    assert [s.name for s in changed.series if s.kind == "feature" and s.drifted] == []  # the inputs did not move
    assert [s.name for s in changed.series if s.kind == "output"] == ["score"]


def test_attribution_settings_are_checked():
    text = """
    upstreams: {a: 127.0.0.1:1}
    routes: [{match: {}, primary: a, drift: {attribution: {output: shap, target: score}}}]
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "conf.yaml")
    assert caught.value.key == "routes[0].drift.attribution.target"
    config = parse_config(text.replace(", target: score", ", threshold: 0.8"))
    assert config.routes[0].drift.attribution == Attribution(output="shap", threshold=0.8)

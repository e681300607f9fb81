"""Drift alarms: Holm's correction over a window's series (against statsmodels), distances' bootstrap p-values,
the family-wise false-alarm rate of healthy windows, the power that stays, persistence (m of the last n windows)
and their settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlmirror.config import Drift, parse_config
from mlmirror.config.schema_observing import Persistence
from mlmirror.errors import ConfigError
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.family import NullScores, bootstrap_draws, holm
from mlmirror.observing.drift.judging import Judge
from mlmirror.observing.drift.persistence import PersistenceTracker
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows, Schema, Series
from mlmirror.observing.drift.scoring import SeriesResult, WindowResult
from statsmodels.stats.multitest import multipletests

from tests.support import feed_rows

# --- Holm ---------------------------------------------------------------------------------------------------------


def _p_value_sets() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sets = [rng.uniform(size=n) ** rng.uniform(0.5, 6.0) for n in (1, 2, 3, 5, 8, 13, 40) for _ in range(4)]
    sets += [np.array([0.0, 0.0, 1.0]), np.array([0.004, 0.004, 0.004]), np.array([1e-300, 0.5, 0.011, 0.0026])]
    return sets


def test_holm_adjusts_and_rejects_as_statsmodels_does():
    level = 0.01
    for p in _p_value_sets():
        reject, want, _, _ = multipletests(p, alpha=level, method="holm")
        got = np.array(holm(p.tolist()))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        assert ((got <= level) == reject).all(), p


def test_holm_leaves_nan_out_of_the_family():
    adjusted = holm([0.004, math.nan, 0.02, math.nan])
    want = multipletests([0.004, 0.02], method="holm")[1]
    assert math.isnan(adjusted[1])
    assert math.isnan(adjusted[3])
    assert adjusted[0] == pytest.approx(want[0])
    assert adjusted[2] == pytest.approx(want[1])
    assert holm([]) == []


def test_bootstrap_draws_reach_a_tenth_of_holms_first_step():
    assert bootstrap_draws(8, 0.01) == 8000
    assert 1 / (bootstrap_draws(8, 0.01) + 1) < 0.01 / 8 / 9
    assert bootstrap_draws(1, 0.5) == 2000
    assert bootstrap_draws(10_000, 0.001) == 50_000


# --- bootstrap p-values of distances ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["psi", "js"])
def test_a_distance_p_value_is_uniform_under_no_drift(method):
    """Healthy pairs (reference 2,000 rows, windows of 200, same law, a sparse last slot), each with its own
    reference: the bootstrap p-value is at or below 5% in about 5% of pairs (binomial sd 0.9% over 600) and at or
    below 20% in about 20% - calibrated, not just conservative."""
    rng = np.random.default_rng(1)
    shares = np.array([0.3, 0.3, 0.2, 0.15, 0.045, 0.005])
    p_values = []
    for i in range(600):
        reference = rng.multinomial(2000, shares).astype(float)
        window = rng.multinomial(200, shares).astype(float)
        p_values.append(NullScores().p_value(f"s{i}", method, reference, 200, _score(method, reference, window), 1000))
    p = np.array(p_values)
    assert 0.025 <= float(np.mean(p <= 0.05)) <= 0.08, float(np.mean(p <= 0.05))
    assert 0.16 <= float(np.mean(p <= 0.2)) <= 0.25, float(np.mean(p <= 0.2))


def _score(method: str, reference: np.ndarray, window: np.ndarray) -> float:
    from mlmirror.kernels.methods import DRIFT_METHODS

    return float(DRIFT_METHODS[method].score(reference[None, :], window[None, :], None)[0])


def test_a_bootstrap_law_is_kept_per_window_size_and_is_reproducible():
    reference = np.array([500.0, 300.0, 200.0])
    nulls = NullScores()
    first = nulls.p_value("x", "psi", reference, 100, 0.05, 2000)
    assert list(nulls._laws) == [("x", "psi", 1000, 100, 2000)]
    assert NullScores().p_value("x", "psi", reference, 100, 0.05, 2000) == first  # seeded: the same law
    nulls.p_value("x", "psi", reference, 150, 0.05, 2000)
    assert len(nulls._laws) == 2
    assert nulls.p_value("x", "psi", reference, 100, 10.0, 2000) == pytest.approx(1 / 2001)  # beyond every draw
    assert nulls.p_value("x", "psi", reference, 100, 0.0, 2000) == 1.0
    assert math.isnan(nulls.p_value("x", "psi", reference, 0, 0.05, 2000))
    assert math.isnan(nulls.p_value("x", "psi", reference, 100, math.nan, 2000))


# --- windows judged as one family -------------------------------------------------------------------------------------

FEATURES = 6


def _schema() -> Schema:
    numeric = [Series(f"x{i}", "feature", "input", i, False) for i in range(FEATURES)]
    return Schema([*numeric, Series("segment", "feature", "segment", None, True)])


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0, share: float = 0.7) -> Rows:
    numeric = rng.normal(size=(n, FEATURES))
    numeric[:, 0] += shift
    segment = np.where(rng.uniform(size=n) < share, b"a", b"b").astype(object)[:, None]
    return Rows(numeric, segment)


def _reference(rng: np.random.Generator, rows: int = 2000) -> Reference:
    return Reference.build(_schema(), _rows(rng, rows), 10, calls=rows)


def _window(reference: Reference, rows: Rows) -> WindowCounts:
    counts = reference.new_window()
    reference.add(counts, rows)
    counts.calls = rows.numeric.shape[0]
    return counts


def _flagged_share(spec: Drift, windows: int, size: int, seed: int, references: int = 4) -> float:
    """Share of healthy windows with any series drifted, over ``references`` references of 2,000 rows."""
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(references):
        reference = _reference(rng)
        judge = Judge("m", spec)
        for _ in range(windows // references):
            series = judge.series(reference, reference.schema, _window(reference, _rows(rng, size)))
            flagged += any(s.drifted for s in series)
    return flagged / windows


def test_healthy_windows_are_flagged_at_most_at_the_family_level():
    """400 healthy windows of 200 rows, 7 series: with the default level (1%) at most 2.5% are flagged (the
    binomial 99.9% bound of 1% over 400 is 2.6%); judged one by one at 1% each, chi-square's and KS's own 1% add
    up across the family."""
    controlled = _flagged_share(Drift(), 400, 200, seed=2)
    assert controlled <= 0.025, controlled
    liberal = _flagged_share(Drift(thresholds={"ks": 0.05, "chi2": 0.05}, alarm_level=None), 400, 200, seed=2)
    assert liberal > 0.05, liberal  # what the per-series thresholds alone let through


def test_a_distance_detector_is_held_to_the_level_by_its_bootstrap():
    # A PSI floor of 0.02 alone flags most healthy windows of 200 rows (10 bins: PSI's null mean is ~0.05)...
    spec = Drift(methods=("psi", "ks"), detect="psi", thresholds={"psi": 0.02, "ks": 0.01, "chi2": 0.01})
    alone = _flagged_share(Drift(**{**_fields(spec), "alarm_level": None}), 40, 200, seed=3)
    assert alone > 0.5, alone
    # ...the family-wise level, with p-values from the reference's bootstrap, brings it down to its level.
    controlled = _flagged_share(spec, 200, 200, seed=3)
    assert controlled <= 0.03, controlled


def _fields(spec: Drift) -> dict:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


def test_a_shifted_window_names_the_series_and_its_adjusted_p_value():
    rng = np.random.default_rng(4)
    reference = _reference(rng)
    judge = Judge("m", Drift())
    series = judge.series(reference, reference.schema, _window(reference, _rows(rng, 1000, shift=0.5, share=0.6)))
    by_name = {s.name: s for s in series}
    assert by_name["x0"].drifted
    assert by_name["segment"].drifted
    assert [s.name for s in series if s.drifted] == ["x0", "segment"]
    assert by_name["x0"].p_value == by_name["x0"].scores["ks"]  # p-value methods: the score itself
    assert by_name["segment"].p_value == by_name["segment"].scores["chi2"]
    want = multipletests([s.p_value for s in series], method="holm")[1]
    np.testing.assert_allclose([s.adjusted for s in series], want, rtol=1e-12)
    assert all(s.threshold == 0.01 for s in series)
    window = WindowResult("m", "m", "1", 0, 1000, 1000, 0.0, 0.0, tuple(series))
    assert window.drifted


def test_without_a_level_each_series_is_judged_alone():
    rng = np.random.default_rng(5)
    reference = _reference(rng)
    series = Judge("m", Drift(alarm_level=None)).series(
        reference, reference.schema, _window(reference, _rows(rng, 1000, shift=0.5))
    )
    assert all(math.isnan(s.p_value) and math.isnan(s.adjusted) for s in series)
    assert [s.name for s in series if s.drifted] == ["x0"]


def test_a_quarter_sd_shift_in_one_feature_is_flagged_within_two_windows_of_1000():
    """The power that stays: 20 references (2,000 rows), each followed by windows of 1,000 rows with feature x0
    shifted by 0.25 sd; the default settings (KS and chi-square, Holm at 1% over 7 series) flag it in the first or
    second window every time."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        reference = _reference(rng)
        judge = Judge("m", Drift())
        flags = [
            {s.name for s in judge.series(reference, reference.schema, _window(reference, _rows(rng, 1000, 0.25)))
             if s.drifted}
            for _ in range(2)
        ]  # fmt: skip
        assert "x0" in flags[0] | flags[1], flags
        assert flags[0] | flags[1] <= {"x0"}


# --- persistence ------------------------------------------------------------------------------------------------------


def _result(drifted: set[str], names: tuple[str, ...] = ("a", "b")) -> WindowResult:
    series = tuple(SeriesResult(n, "feature", False, {}, "ks", n in drifted, 0) for n in names)
    return WindowResult("r", "m", "1", 0, 10, 10, 0.0, 0.0, series)


def test_persistent_means_m_of_the_last_n_windows():
    tracker = PersistenceTracker(Persistence(m=2, n=3))
    key = ("m", "1")
    seen = [tracker.see(key, _result(d)).persistent for d in ({"a"}, set(), {"a", "b"}, {"b"}, set(), set())]
    assert seen == [frozenset(), frozenset(), {"a"}, {"b"}, {"b"}, frozenset()]
    other = tracker.see(("m", "2"), _result({"a"}))  # each model version on its own
    assert other.persistent == frozenset()
    tracker.forget(("m", "2"))
    assert tracker.see(("m", "2"), _result({"a"})).persistent == frozenset()


def test_without_persistence_persistent_is_drifted_now():
    tracker = PersistenceTracker(None)
    assert tracker.see(("m", "1"), _result({"a"})).persistent == {"a"}
    assert tracker.see(("m", "1"), _result(set())).persistent == frozenset()


def test_the_engine_marks_persistent_series_in_its_latest_window():
    rng = np.random.default_rng(8)
    engine = DriftEngine("m", Drift(window=200, capture=1000, persistence=Persistence(m=2, n=3), multivariate=None))
    feed_rows(engine, rng.normal(size=(1000, 2)))
    feed_rows(engine, rng.normal(size=(200, 2)) + np.array([2.0, 0.0]))
    first = engine.latest["m", "1"]
    assert [s.name for s in first.series if s.drifted] == ["input[0]"]
    assert first.persistent == frozenset()  # one window is not a state
    feed_rows(engine, rng.normal(size=(200, 2)) + np.array([2.0, 0.0]))
    assert engine.latest["m", "1"].persistent == {"input[0]"}
    assert engine.history[-1].persistent == {"input[0]"}


# --- settings ---------------------------------------------------------------------------------------------------------

BASE = """
upstreams: {a: 127.0.0.1:1}
routes: [{match: {}, primary: a, drift: DRIFT}]
"""


def _drift(text: str) -> Drift:
    drift = parse_config(BASE.replace("DRIFT", text)).routes[0].drift
    assert drift is not None
    return drift


def test_alarm_settings_are_read_and_checked():
    default = _drift("{}")
    assert (default.alarm_level, default.persistence) == (0.01, None)
    assert _drift("{alarm_level: off}").alarm_level is None
    assert _drift("{alarm_level: 0.001}").alarm_level == 0.001
    assert _drift("{persistence: {}}").persistence == Persistence(m=2, n=3)
    assert _drift("{persistence: {m: 3, n: 5}}").persistence == Persistence(m=3, n=5)
    for bad, where, says in (
        ("{alarm_level: 0.7}", "alarm_level", "0.5"),
        ("{alarm_level: 0}", "alarm_level", "1e-06"),
        ("{persistence: {m: 4, n: 3}}", "persistence.m", "cannot be more than n"),
        ("{persistence: {m: 0}}", "persistence.m", "1"),
        ("{persistence: {k: 2}}", "persistence.k", "allowed: m, n"),
    ):
        with pytest.raises(ConfigError) as caught:
            _drift(bad)
        assert caught.value.key.endswith(where), (bad, caught.value.key)
        assert says in str(caught.value), (bad, str(caught.value))


def test_a_scrape_shows_the_window_decision_and_the_persistent_series():
    from mlmirror.observing.drift.report import DriftCollector, drift_status

    rng = np.random.default_rng(9)
    engine = DriftEngine("m", Drift(window=200, capture=1000, persistence=Persistence(m=2, n=3), multivariate=None))
    feed_rows(engine, rng.normal(size=(1000, 2)))
    for _ in range(2):
        feed_rows(engine, rng.normal(size=(200, 2)) + np.array([2.0, 0.0]))
    samples = {
        (s.name, s.labels.get("series")): s.value
        for family in DriftCollector(lambda: [engine]).collect()
        for s in family.samples
        if s.name in ("mlmirror_drift_window_detected", "mlmirror_drift_persistent", "mlmirror_drift_detected")
    }
    assert samples == {
        ("mlmirror_drift_window_detected", None): 1.0,
        ("mlmirror_drift_persistent", "input[0]"): 1.0,
        ("mlmirror_drift_persistent", "input[1]"): 0.0,
        ("mlmirror_drift_detected", "input[0]"): 1.0,
        ("mlmirror_drift_detected", "input[1]"): 0.0,
    }
    status = drift_status(engine)
    assert (status["alarm_level"], status["persistence"]) == (0.01, [2, 3])
    latest = status["latest"][0]
    assert latest["persistent"] == ["input[0]"]
    assert latest["series"][0]["adjusted"] <= 0.01 < latest["series"][1]["adjusted"]

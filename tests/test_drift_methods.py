"""The drift-method registry is the one table of method facts: config validation, the engine and the docs read it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlmirror.config import DRIFT_METHODS as CONFIG_DEFAULTS
from mlmirror.config import Drift, parse_config
from mlmirror.errors import ConfigError
from mlmirror.kernels.methods import DEFAULT_CATEGORICAL, DEFAULT_NUMERIC, DRIFT_METHODS, methods_table
from mlmirror.observing.drift.scoring import score_counts

ROOT = Path(__file__).resolve().parent.parent


def drift_config(thresholds: str) -> str:
    return (
        "upstreams: {a: 127.0.0.1:9001}\n"
        "routes:\n"
        "  - match: {}\n"
        "    primary: a\n"
        "    drift:\n"
        "      features: [{input: input}]\n"
        f"      thresholds: {{{thresholds}}}\n"
    )


def test_the_docs_hold_the_registry_table():
    assert methods_table() in (ROOT / "docs" / "DRIFT.md").read_text(encoding="utf-8")


def test_config_defaults_are_the_registry_defaults():
    assert {name: m.default_threshold for name, m in DRIFT_METHODS.items()} == CONFIG_DEFAULTS
    assert dict(Drift().thresholds) == CONFIG_DEFAULTS


@pytest.mark.parametrize("name", sorted(DRIFT_METHODS))
def test_a_threshold_above_one_is_refused_exactly_for_p_values(name: str):
    text = drift_config(f"{name}: 1.5")
    if DRIFT_METHODS[name].p_value:
        with pytest.raises(ConfigError):
            parse_config(text)
    else:
        route = parse_config(text).routes[0]
        assert route.drift is not None
        assert route.drift.thresholds[name] == 1.5


def test_an_unknown_method_names_the_registry():
    with pytest.raises(ConfigError) as caught:
        parse_config(drift_config("bogus: 0.1"))
    assert all(name in str(caught.value) for name in DRIFT_METHODS)


@pytest.mark.parametrize("categorical", [False, True])
def test_the_engine_scores_what_the_registry_says_applies(categorical: bool):
    rng = np.random.default_rng(3)
    reference = rng.integers(1, 50, size=(2, 6)).astype(np.float64)
    current = rng.integers(1, 50, size=(2, 6)).astype(np.float64)
    positions = np.tile(np.arange(6, dtype=np.float64), (2, 1))
    scores = score_counts(reference, current, tuple(DRIFT_METHODS), positions, categorical=categorical)
    expected = {name for name, m in DRIFT_METHODS.items() if m.applies_to(categorical=categorical)}
    assert set(scores) == expected
    assert (DEFAULT_CATEGORICAL if categorical else DEFAULT_NUMERIC) in scores
    for name, values in scores.items():
        assert values.shape == (2,)
        assert np.all(np.isfinite(values)), name
        if DRIFT_METHODS[name].p_value:
            assert np.all((values >= 0) & (values <= 1)), name


def test_drifted_reads_the_direction_from_the_registry():
    assert DRIFT_METHODS["ks"].drifted(0.001, 0.01)
    assert not DRIFT_METHODS["ks"].drifted(0.5, 0.01)
    assert DRIFT_METHODS["psi"].drifted(0.5, 0.2)
    assert not DRIFT_METHODS["psi"].drifted(0.1, 0.2)
    assert not DRIFT_METHODS["psi"].drifted(math.nan, 0.2)

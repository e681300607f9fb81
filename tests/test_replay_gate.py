"""The replay gate file: its keys, their defaults (the promotion defaults), and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlmirror.config import Compare, Promotion
from mlmirror.errors import ConfigError
from mlmirror.replay.gate import DriftGate, Gate, QualityGate, load_gate, parse_gate


def test_an_empty_gate_is_the_promotion_defaults():
    gate = parse_gate("", "gate.yaml")
    assert gate == Gate(source="gate.yaml")
    assert (gate.promotion, gate.compare, gate.drift, gate.quality) == (
        Promotion(),
        Compare(),
        DriftGate(),
        QualityGate(),
    )
    assert (gate.promotion.min_samples, gate.promotion.agreement, gate.promotion.confidence) == (200, 0.98, 0.95)


def test_every_key_is_read():
    gate = parse_gate(
        """
        min_samples: 50
        agreement: 0.995
        confidence: 0.99
        error_margin: 0.002
        latency_factor: 1.2
        compare: {atol: 0.01, rtol: 0, classification: argmax, output: probabilities}
        drift: {method: psi, bins: 20, outputs: [probabilities]}
        quality: {task: regression, metric: mae, margin: 0.5}
        """.replace("\n        ", "\n")
    )
    assert gate.promotion == Promotion(min_samples=50, agreement=0.995, confidence=0.99, error_margin=0.002,
                                       latency_factor=1.2)  # fmt: skip
    assert gate.compare == Compare(atol=0.01, rtol=0.0, classification="argmax", output="probabilities")
    assert gate.drift == DriftGate(method="psi", threshold=0.2, bins=20, outputs=("probabilities",))
    assert gate.quality == QualityGate(output="probabilities", task="regression", metric="mae", margin=0.5)
    assert not gate.quality.higher_is_better


@pytest.mark.parametrize("off", ["off", "false", "null"])
def test_drift_can_be_switched_off(off: str):
    assert parse_gate(f"drift: {off}\n").drift is None


def test_a_regression_quality_defaults_to_rmse_and_classification_to_accuracy():
    assert parse_gate("quality: {task: regression}\n").quality.metric == "rmse"
    assert parse_gate("quality: {output: y}\n").quality == QualityGate(output="y")
    assert QualityGate().higher_is_better


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agreemnt: 0.9\n", "gate.yaml:1: agreemnt: unknown key (did you mean 'agreement'?)"),
        ("agreement: 1.5\n", "gate.yaml:1: agreement: must be <= 1.0, got 1.5"),
        ("confidence: 0.1\n", "gate.yaml:1: confidence: must be >= 0.5, got 0.1"),
        ("min_samples: 0\n", "gate.yaml:1: min_samples: must be >= 1, got 0"),
        ("\ndrift: {method: kss}\n", "gate.yaml:2: drift.method: unknown drift method 'kss' (one of ks, chi2, psi, js, "
                                     "hellinger, linf, kl, w1)"),
        ("drift: {method: ks, threshold: 2}\n", "gate.yaml:1: drift.threshold: must be <= 1.0, got 2.0"),
        ("compare: {classification: top1}\n", "gate.yaml:1: compare.classification: unknown classification 'top1' "
                                              "(one of none, argmax, label)"),
        ("quality: {task: regression, metric: accuracy}\n", "gate.yaml:1: quality.metric: unknown regression metric "
                                                            "'accuracy' (one of mae, rmse)"),
        ("- 1\n", "gate.yaml:1: expected a mapping, got a list"),
        ("agreement: [\n", "gate.yaml:2: invalid YAML: expected the node content"),
    ],
)  # fmt: skip
def test_bad_gates_are_errors_with_file_line_and_key(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_gate(text, "gate.yaml")
    assert str(caught.value).startswith(message)


def test_a_missing_gate_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such gate file"):
        load_gate(tmp_path / "nope.yaml")
    (tmp_path / "gate.yaml").write_text("agreement: 0.9\n")
    assert load_gate(tmp_path / "gate.yaml").promotion.agreement == 0.9

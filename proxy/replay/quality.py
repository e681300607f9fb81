"""Quality of a replay: the candidate's and production's predictions against the outcomes in the capture.

Only the calls with an outcome that both answered are scored, so the two models are judged on the same labelled
rows. Predictions are read from the output as live ground truth reads them (``GroundTruthStore.predictions``: the
argmax of a [n, k] tensor, or the label of a [n] one, as text; the value for regression) and the outcome as
``report`` reads it (labels, else values, as text; values for regression). A call whose outcome does not hold one
value per row, or whose output cannot be read, is counted ``invalid``.

- classification: accuracy and macro precision, recall, F1 (``classification_metrics``);
- regression: MAE = mean |y - ŷ|, RMSE = sqrt(mean (y - ŷ)^2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from mlmirror.config import GroundTruth
from mlmirror.observing.groundtruth.outcomes import GroundTruthStore, classification_metrics
from mlmirror.protocol.kserve import Tensor, TensorError
from mlmirror.replay.captured import GroundTruthRecord
from mlmirror.replay.gate import QualityGate

__all__ = ["QualityScore", "score_quality"]


@dataclass(frozen=True, slots=True)
class QualityScore:
    """Metrics of both models over ``calls`` labelled calls (``rows`` rows) of output ``output``."""

    task: str
    metric: str
    output: str
    calls: int
    rows: int
    candidate: dict[str, float]
    production: dict[str, float]
    invalid: int


def score_quality(
    labelled: Iterable[tuple[GroundTruthRecord, list[Tensor], list[Tensor]]], gate: QualityGate
) -> QualityScore | None:
    """Metrics over (outcome, production outputs, candidate outputs) triples; None when there are none."""
    store: GroundTruthStore | None = None
    truth: list = []
    production: list = []
    candidate: list = []
    calls = invalid = 0
    for outcome, production_outputs, candidate_outputs in labelled:
        if store is None:
            output = gate.output or (production_outputs[0].name if production_outputs else "")
            store = GroundTruthStore(GroundTruth(output=output, task=gate.task))
        try:
            p = store.predictions(production_outputs)
            c = store.predictions(candidate_outputs)
        except TensorError:
            invalid += 1
            continue
        regression = gate.task == "regression"
        actual = list(outcome.values) if regression else [str(v) for v in outcome.labels or outcome.values]
        if len(actual) != len(p) or len(actual) != len(c) or (regression and outcome.labels):
            invalid += 1
            continue
        calls += 1
        truth += actual
        production += p
        candidate += c
    if store is None:
        return None
    return QualityScore(
        gate.task, gate.metric, store.spec.output, calls, len(truth),
        _metrics(candidate, truth, gate.task), _metrics(production, truth, gate.task), invalid,
    )  # fmt: skip


def _metrics(predicted: list, actual: list, task: str) -> dict[str, float]:
    if not actual:
        names = ("mae", "rmse") if task == "regression" else ("accuracy", "precision", "recall", "f1")
        return dict.fromkeys(names, math.nan)
    if task == "regression":
        error = np.asarray(actual, dtype=np.float64) - np.asarray(predicted, dtype=np.float64)
        return {"mae": float(np.mean(np.abs(error))), "rmse": float(math.sqrt(np.mean(error**2)))}
    return classification_metrics(predicted, actual)

"""Prediction drift of a replay: the candidate's outputs against production's captured outputs on the same calls.

Done exactly as live drift does it, with its own pieces: the output series of the first call's answer
(``schema.discover``, outputs only), a ``Reference`` built from production's output rows (quantile edges, ``bins``
per numeric series; a vocabulary per categorical one), the candidate's rows counted into a window of it, and the
window scored by the drift engine (``DriftEngine.score``: the Numba kernels, ``chi2`` standing in for numeric-only
methods on categorical series, p-values below the threshold and distances above it drifting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from mlmirror.config import DRIFT_METHODS, Drift
from mlmirror.observing.drift.engine import DriftEngine, SeriesResult
from mlmirror.observing.drift.reference import Reference
from mlmirror.observing.drift.schema import Rows, Schema, discover
from mlmirror.protocol.kserve import Tensor, TensorError
from mlmirror.replay.gate import DriftGate

__all__ = ["DriftScore", "prediction_drift"]


@dataclass(frozen=True, slots=True)
class DriftScore:
    """Scores per output series over ``calls`` calls (``rows`` production rows); ``errors``: calls left out, by
    the reason their outputs could not be read."""

    method: str
    calls: int
    rows: int
    series: tuple[SeriesResult, ...] = ()
    errors: dict[str, int] = field(default_factory=dict)


def prediction_drift(pairs: Iterable[tuple[list[Tensor], list[Tensor]]], gate: DriftGate) -> DriftScore:
    """Drift of the candidate's outputs (second of each pair) against production's (first)."""
    spec = Drift(
        outputs=gate.outputs, bins=gate.bins, methods=(gate.method,), detect=gate.method,
        thresholds=MappingProxyType({**DRIFT_METHODS, gate.method: gate.threshold}), multivariate=None,
        alarm_level=None,  # a gate's criterion is its threshold, per series (not the live alarms' family level)
    )  # fmt: skip
    schema: Schema | None = None
    production: list[Rows] = []
    candidate: list[Rows] = []
    errors: dict[str, int] = {}
    for production_outputs, candidate_outputs in pairs:
        try:
            if schema is None:
                schema = discover(spec, [], production_outputs)
            p = schema.rows([], production_outputs)
            c = schema.rows([], candidate_outputs)
        except TensorError as exc:
            errors[exc.reason] = errors.get(exc.reason, 0) + 1
            continue
        production.append(p)
        candidate.append(c)
    if schema is None or not production:
        return DriftScore(gate.method, 0, 0, (), errors)
    reference = Reference.build(schema, _concat(production), spec.bins, calls=len(production))
    counts = reference.new_window()
    reference.add(counts, _concat(candidate))
    counts.calls = len(candidate)
    result = DriftEngine("replay", spec, reference).score(counts, ("", ""), 0, 0.0)
    return DriftScore(gate.method, len(production), reference.counts.rows, result.series, errors)


def _concat(rows: list[Rows]) -> Rows:
    return Rows(np.concatenate([r.numeric for r in rows]), np.concatenate([r.categorical for r in rows]))

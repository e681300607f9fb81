"""The gate's criteria, each with its value, its threshold and whether it passed; the gate passes when all do.

The promotion criteria are the live shadow verdict's (``judge`` in proxy/observing/shadows/verdict.py), one by one,
with no control shadow (noise 0):

- ``min_samples``: agreement samples >= ``min_samples``;
- ``agreement``: the Wilson lower bound of the agreement ratio at ``confidence`` >= ``agreement``;
- ``errors``: the candidate's error ratio <= production's + ``error_margin`` (production's: captured calls its
  primary did not answer, over calls);
- ``latency``: the candidate's p99 latency <= ``latency_factor`` x production's captured p99 (seconds);

then one ``drift <series>`` per output series (its method's score against the threshold; a p-value drifts below
it, a distance above; one failing ``drift`` when no output series could be read, one skipped ``drift`` when no
ModelInfer call was compared), and ``quality <metric>``: the candidate's metric no worse than production's by more than
``margin``. Quality is *skipped* (neither passed nor failed) when the capture holds no outcome for a compared call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlmirror.observing.shadows.verdict import wilson_lower_bound
from mlmirror.replay.gate import Gate
from mlmirror.replay.prediction_drift import DriftScore
from mlmirror.replay.quality import QualityScore
from mlmirror.replay.scoring import ReplayScores

__all__ = ["Criterion", "evaluate", "format_number"]

_P_VALUES = ("ks", "chi2")


@dataclass(frozen=True, slots=True)
class Criterion:
    """One line of the gate. ``passed`` None: skipped (not measurable from this capture)."""

    name: str
    passed: bool | None
    value: float
    threshold: float
    detail: str

    @property
    def summary(self) -> str:
        """``name: value vs threshold``, short."""
        return f"{self.name}: {format_number(self.value)} vs threshold {format_number(self.threshold)}"

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else ("pass" if self.passed else "FAIL")


def evaluate(
    gate: Gate, scores: ReplayScores, drift: DriftScore | None, quality: QualityScore | None
) -> list[Criterion]:
    """Every criterion of ``gate`` for these results, in the order above."""
    p, s = gate.promotion, scores.summary
    lower = wilson_lower_bound(s.agree, s.samples, p.confidence)
    errors, production_errors = s.shadow_error_ratio, s.production_error_ratio
    error_limit = production_errors + p.error_margin
    latency_limit = s.production_p99 * p.latency_factor
    criteria = [
        Criterion("min_samples", s.samples >= p.min_samples, s.samples, p.min_samples,
                  f"{s.samples} agreement samples from {s.compared} compared calls (at least {p.min_samples})"),
        Criterion("agreement", lower >= p.agreement, lower, p.agreement,
                  f"Wilson lower bound {lower:.4f} of agreement {_f(s.agreement)} at confidence {p.confidence:g} "
                  f"(needs >= {p.agreement:g})"),
        Criterion("errors", bool(errors <= error_limit), errors, error_limit,
                  f"candidate error ratio {_pct(errors)} vs production {_pct(production_errors)} "
                  f"+ margin {_pct(p.error_margin)}"),
        Criterion("latency", bool(s.shadow_p99 <= latency_limit), s.shadow_p99, latency_limit,
                  f"candidate p99 {_ms(s.shadow_p99)} vs {p.latency_factor:g} x production p99 "
                  f"{_ms(s.production_p99)}"),
    ]  # fmt: skip
    if drift is not None:
        criteria += _drift(drift)
    criteria.append(_quality(gate, quality))
    return criteria


def _drift(drift: DriftScore) -> list[Criterion]:
    if not drift.series and not drift.errors:
        return [Criterion("drift", None, math.nan, math.nan, "no compared KServe ModelInfer calls")]
    if not drift.series:
        why = ", ".join(f"{reason} x{n}" for reason, n in drift.errors.items()) or "no compared calls"
        return [Criterion("drift", False, math.nan, math.nan, f"no output series could be read ({why})")]
    criteria = []
    for series in drift.series:
        value = series.scores.get(series.method, math.nan)
        if series.method in _P_VALUES:
            what, side = f"{series.method} p-value", "<" if series.drifted else ">="
        else:
            what, side = series.method, ">" if series.drifted else "<="
        criteria.append(
            Criterion(f"drift {series.name}", not series.drifted, value, series.threshold,
                      f"{what} {_f(value)} {side} {series.threshold:g} over {drift.calls} calls, {drift.rows} rows")
        )  # fmt: skip
    return criteria


def _quality(gate: Gate, quality: QualityScore | None) -> Criterion:
    q = gate.quality
    name = f"quality {q.metric}"
    if quality is None or quality.rows == 0:
        return Criterion(name, None, math.nan, math.nan, "no outcomes in the capture for the compared calls")
    candidate, production = quality.candidate[q.metric], quality.production[q.metric]
    if q.higher_is_better:
        limit, passed, word = production - q.margin, candidate >= production - q.margin, "at least"
    else:
        limit, passed, word = production + q.margin, candidate <= production + q.margin, "at most"
    return Criterion(name, bool(passed), candidate, limit,
                     f"candidate {q.metric} {_f(candidate)} vs production {_f(production)} on {quality.rows} rows of "
                     f"{quality.calls} labelled calls (needs {word} {_f(limit)})")  # fmt: skip


def _f(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def format_number(value: float) -> str:
    """A value for the reports: integers as they are, floats to 4 significant digits, NaN as ``n/a``."""
    if isinstance(value, int):
        return str(value)
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2%}"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 1e3:.2f} ms"

"""Scoring a replay call by call: the candidate's answer against production's captured one, by the live rules.

Each call becomes one ``Outcome`` of the shadows' verdict window (proxy/observing/shadows/verdict.py), so that the
totals are the live shadow's: agreement samples from ``Comparator`` (the ``compare`` block's semantics), error
ratios, p99 latencies, MAE/RMSE/max over the numeric elements. Production's side comes from the capture:

- production *answered* a call when its captured code is OK and its primary (not a fallback, not the static
  default) answered; its latency is the captured ``upstream_latency`` (seconds), the candidate's the replay's own;
- answers are *compared* when production answered, its answer was captured, the candidate answered OK, and the
  request was not redacted (the candidate saw zeroed inputs, production the real ones: such calls count for errors
  and latency only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
from mlmirror.config import Compare
from mlmirror.observing.shadows.compare import Comparator, Comparison, ProductionAnswer
from mlmirror.observing.shadows.verdict import Outcome, Window, WindowSummary
from mlmirror.replay.captured import CapturedCall
from mlmirror.replay.sender import Answer

__all__ = ["CallScore", "ReplayScores", "score_calls"]

#: Disagreeing calls listed in the reports, worst first.
WORST = 10
_OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class CallScore:
    """One disagreeing call, for the reports: ``disagreement`` is 1 - agree/samples (1 for a comparison error)."""

    request_id: str
    location: str
    disagreement: float
    abs_max: float
    error: str | None


@dataclass
class ReplayScores:
    """Totals of a replay: the verdict window's summary, and counts by reason."""

    summary: WindowSummary
    candidate_codes: dict[str, int] = field(default_factory=dict)
    production_codes: dict[str, int] = field(default_factory=dict)
    comparison_errors: dict[str, int] = field(default_factory=dict)
    redacted: int = 0
    not_compared: int = 0
    worst: list[CallScore] = field(default_factory=list)
    candidate_p50: float = math.nan
    production_p50: float = math.nan


def production_answered(call: CapturedCall) -> bool:
    return call.code is _OK and call.primary


def compared(call: CapturedCall, answer: Answer) -> bool:
    """Whether the two answers are compared (see the module docstring)."""
    return production_answered(call) and call.response is not None and answer.code is _OK and not call.redacted


def score_calls(calls: list[CapturedCall], answers: list[Answer], spec: Compare) -> ReplayScores:
    """Compare every answer with production's captured one (``calls[i]`` was answered by ``answers[i]``)."""
    comparator = Comparator(spec)
    window = Window(max(1, len(calls)))
    scores = ReplayScores(summary=window.summary())
    disagreeing: list[CallScore] = []
    candidate_latency, production_latency = [], []
    for call, answer in zip(calls, answers, strict=True):
        _count(scores.candidate_codes, answer.code.name)
        _count(scores.production_codes, call.code.name if call.primary or call.code is not _OK else "FALLBACK")
        scores.redacted += bool(call.redacted)
        comparison = None
        if compared(call, answer):
            assert call.response is not None
            assert answer.response is not None
            comparison = comparator.compare(ProductionAnswer(call.method, call.response), answer.response)
            if comparison.error is not None:
                _count(scores.comparison_errors, comparison.error)
            if comparison.error is not None or comparison.agree < comparison.samples:
                disagreeing.append(_disagreement(call, comparison))
        else:
            scores.not_compared += 1
        produced = production_answered(call)
        latency = call.upstream_latency if math.isfinite(call.upstream_latency) else call.latency
        window.add(_outcome(answer, comparison, produced, latency if produced else math.nan))
        candidate_latency.append(answer.latency)
        if produced and math.isfinite(latency):
            production_latency.append(latency)
    scores.summary = window.summary()
    scores.candidate_p50 = _median(candidate_latency)
    scores.production_p50 = _median(production_latency)
    disagreeing.sort(key=lambda s: (s.error is None, -s.disagreement, -(s.abs_max if s.abs_max >= 0 else 0.0)))
    scores.worst = disagreeing[:WORST]
    return scores


def _outcome(answer: Answer, comparison: Comparison | None, produced: bool, production_latency: float) -> Outcome:
    c = comparison or Comparison(matched=False, agree=0, samples=0)
    return Outcome(
        shadow_ok=answer.code is _OK,
        production_ok=produced,
        agree=c.agree,
        samples=c.samples,
        shadow_latency=answer.latency,
        production_latency=production_latency,
        abs_sum=c.abs_sum,
        sq_sum=c.sq_sum,
        abs_max=c.abs_max,
        elements=c.elements,
        compared=comparison is not None,
    )


def _disagreement(call: CapturedCall, c: Comparison) -> CallScore:
    share = 1.0 if c.error is not None or not c.samples else 1.0 - c.agree / c.samples
    return CallScore(call.request_id, call.location, share, c.abs_max if c.elements else math.nan, c.error)


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

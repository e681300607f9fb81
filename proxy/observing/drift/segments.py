"""Quality per segment: the values of one categorical feature (``drift.segment``) split a window's rows.

The segments are the reference vocabulary's ``segment_values`` most frequent values of that feature, in that order,
then ``other`` for every other value (so at most ``segment_values + 1`` segments, whatever the traffic). Per segment
s of a window (n_s rows) and class c:

- prediction share: share_s(c) = (rows of s predicted c) / n_s;
- estimated accuracy: the label-free estimate over the rows of s (``groundtruth.estimate``);
- realized accuracy: correct / joined rows of s, over the outcome rows of the latest realized window.

Gaps, over the segments with at least ``MIN_ROWS`` rows (fewer make noise, not a signal):

- demographic-parity difference: max over classes c of (max_s share_s(c) - min_s share_s(c)) (for a binary
  classifier and c the positive class, the usual |P(ŷ=1 | s) - P(ŷ=1 | s')| at its largest);
- accuracy gap (estimated, and realized): max_s accuracy_s - min_s accuracy_s.

Memory per model version: O(segments · classes) numbers per window (see ``estimate.Expected``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlmirror.observing.drift.reference import Reference
from mlmirror.observing.drift.schema import Rows, Schema
from mlmirror.observing.groundtruth.estimate import Expected

__all__ = ["MIN_ROWS", "OTHER", "SegmentResult", "Segmenter", "summarize"]

#: Segments with fewer rows than this are shown but left out of the gaps.
MIN_ROWS = 30
OTHER = "other"


class Segmenter:
    """Maps a call's rows to segment indices (0 .. len(names) - 1, the last ``other``)."""

    def __init__(self, schema: Schema, reference: Reference, feature: str, values: int) -> None:
        """Raises ValueError when ``feature`` is not a categorical series of ``schema``."""
        names = [s.name for s in schema.categorical]
        if feature not in names:
            raise ValueError(f"segment {feature!r} is not a categorical series (those are {names})")
        self.column = names.index(feature)
        vocabulary = reference.vocabularies[self.column]
        kept = sorted(vocabulary, key=vocabulary.__getitem__)[:values]  # most frequent first
        self.codes = {value: i for i, value in enumerate(kept)}
        self.names = [*(_text(v) for v in kept), OTHER]

    def __len__(self) -> int:
        return len(self.names)

    def of(self, rows: Rows) -> np.ndarray:
        other = len(self.names) - 1
        return np.fromiter((self.codes.get(v, other) for v in rows.categorical[:, self.column]), np.int64)


@dataclass
class Realized:
    """Joined outcome rows per segment: rows, correct predictions."""

    rows: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls, segments: int) -> Realized:
        return cls(np.zeros(segments, np.int64), np.zeros(segments, np.int64))

    def add(self, segments: np.ndarray, correct: np.ndarray) -> None:
        np.add.at(self.rows, segments, 1)
        np.add.at(self.correct, segments, correct.astype(np.int64))


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """One segment of one window."""

    name: str
    rows: int
    shares: tuple[float, ...]  # per class
    estimated_accuracy: float
    accuracy: float  # realized; NaN before outcomes
    outcome_rows: int


def summarize(
    names: list[str], expected: Expected, realized: Realized | None
) -> tuple[tuple[SegmentResult, ...], dict[str, float]]:
    """The segments of a window and its gaps (``demographic_parity``, ``estimated_accuracy``, ``accuracy``; NaN
    when fewer than two segments have ``MIN_ROWS`` rows)."""
    expected.flush()
    results = []
    for s, name in enumerate(names):
        n = int(expected.rows[s])
        shares = tuple(float(x) for x in (expected.predicted[s] / n if n else np.full(expected.classes, np.nan)))
        joined = int(realized.rows[s]) if realized is not None else 0
        accuracy = realized.correct[s] / joined if realized is not None and joined else float("nan")
        results.append(SegmentResult(name, n, shares, expected.accuracy(s), float(accuracy), joined))
    big = [r for r in results if r.rows >= MIN_ROWS]
    answered = [r for r in results if r.outcome_rows >= MIN_ROWS]
    gaps = {
        "demographic_parity": _spread([r.shares for r in big]),
        "estimated_accuracy": _spread([(r.estimated_accuracy,) for r in big]),
        "accuracy": _spread([(r.accuracy,) for r in answered]),
    }
    return tuple(results), gaps


def _spread(values: list[tuple[float, ...]]) -> float:
    """max over columns of (max - min over rows); NaN with fewer than two rows."""
    if len(values) < 2:
        return float("nan")
    table = np.asarray(values, np.float64)
    return float((table.max(axis=0) - table.min(axis=0)).max())


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

"""Model and data quality per drift window: the label-free accuracy estimate, data-quality checks and segments.

The drift engine's worker ``observe``s every windowed call (its probability output, its rows) and ``close``s the
quality window with the drift window, same calls, same index. The ground-truth store hands over each joined
outcome (``joined``, on the event loop):

- the first ``ground_truth.calibration`` joined rows of a model version are its **labelled reference**: the
  probabilities the model gave for them (kept with the call until its outcome comes) and their true classes fit the
  version's isotonic calibration (``groundtruth.estimate``); until then, or with ``calibration: 0``, probabilities
  are assumed calibrated (``calibrated: false`` in ``/status``);
- with a ``drift.segment``, joined rows also count into the realized accuracy per segment, over windows of
  ``ground_truth.window`` outcome rows.

The estimate needs a classification ``ground_truth`` whose output is a probability tensor [rows, k >= 2]; calls
without one, or with a value that is not finite, are counted (``unestimated``) and left out of the estimate.
Memory: per model version a window of O(segments · k) sums, the latest result, and the calibration rows
(``calibration`` · k floats) until fitted; per call waiting for its outcome (only while a version is uncalibrated,
or with segments) its probabilities and segment indices, at most ``ground_truth.max_pending`` calls (the oldest
forgotten first; about 0.45 KB for a 1-row, 3-class call with segments, measured: 9 MiB at the default 20000),
and as many outcomes joined before their call was observed (an early outcome, parked until its prediction was
stored, joins before the worker observes the call; a captured call is never observed).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from mlmirror.config import Drift
from mlmirror.observing.drift.data_quality import DataQualityResult, blanks, data_quality
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows
from mlmirror.observing.drift.segments import Realized, Segmenter, SegmentResult, summarize
from mlmirror.observing.groundtruth.estimate import Calibrator, Expected
from mlmirror.protocol.kserve import Tensor

__all__ = ["QualityMonitor", "QualityWindow"]

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class QualityWindow:
    """The quality of one closed drift window of a model version. Estimates are NaN when no call carried
    probabilities; ``segments``/``gaps`` are empty without ``drift.segment``."""

    model: str
    version: str
    index: int
    rows: int  # rows estimated
    estimated_accuracy: float
    estimated_f1: float
    calibrated: bool  # every estimated row was calibrated on a labelled reference
    below_target: bool  # the estimate has been below ground_truth.target for target_windows windows in a row
    low_windows: int  # windows in a row below the target (0 without one)
    data: tuple[DataQualityResult, ...]
    segments: tuple[SegmentResult, ...] = ()
    gaps: dict[str, float] | None = None


@dataclass
class _Window:
    expected: Expected | None = None
    blanks: np.ndarray | None = None
    calibrated_rows: int = 0


class QualityMonitor:
    """Quality of one route's windows (see the module docstring); thread-safe."""

    def __init__(self, route: str, spec: Drift) -> None:
        self.route = route
        self.spec = spec
        truth = spec.ground_truth
        self.truth = truth if truth is not None and truth.task == "classification" else None
        self._lock = threading.Lock()
        self._open: dict[Key, _Window] = {}
        self._pending: OrderedDict[str, tuple[Key, np.ndarray, np.ndarray | None]] = OrderedDict()
        #: outcomes joined before the call was observed (a parked early outcome joins as its prediction is stored,
        #: before the worker gets here; a captured call is never observed): at most ``max_pending``, oldest out
        self._early: OrderedDict[str, tuple[Key, list]] = OrderedDict()
        self._labelled: dict[Key, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.calibrators: dict[Key, Calibrator] = {}
        self._realized: dict[Key, Realized] = {}
        self._realized_latest: dict[Key, Realized] = {}
        self._streak: dict[Key, int] = {}
        self.segmenter: Segmenter | None = None
        self.segment_error: str | None = None
        self.latest: dict[Key, QualityWindow] = {}
        self.unestimated = 0  # windowed calls whose output was not a probability tensor

    # --- worker thread ----------------------------------------------------------------------------------------

    def observe(self, key: Key, request_id: str, outputs: list[Tensor], rows: Rows, reference: Reference) -> None:
        """Count one windowed call (``rows`` read by the reference's schema)."""
        segments = self._segments(reference, rows)
        with self._lock:
            window = self._open.setdefault(key, _Window())
            found = blanks(rows)
            window.blanks = found if window.blanks is None else window.blanks + found
            truth = self.truth
            probabilities = self._probabilities(outputs)
            if truth is None or probabilities is None:
                self.unestimated += truth is not None
                return
            calibrator = self.calibrators.get(key)
            if calibrator is not None and calibrator.classes != probabilities.shape[1]:
                calibrator = None
            calibrated = calibrator.apply(probabilities) if calibrator is not None else probabilities
            if window.expected is None:
                window.expected = Expected(len(self.segmenter) if self.segmenter else 1, probabilities.shape[1])
            if window.expected.classes != probabilities.shape[1]:
                self.unestimated += 1
                return
            window.expected.add(probabilities, calibrated, segments)
            window.calibrated_rows += probabilities.shape[0] if calibrator is not None else 0
            if self.segmenter is not None or (key not in self.calibrators and truth.calibration > 0):
                self._pending[request_id] = (key, probabilities.astype(np.float32), segments)
                self._pending.move_to_end(request_id)
                while len(self._pending) > truth.max_pending:
                    self._pending.popitem(last=False)
                early = self._early.pop(request_id, None)
                if early is not None:
                    self._join(request_id, *early)

    def _segments(self, reference: Reference, rows: Rows) -> np.ndarray | None:
        if self.spec.segment is None or self.segment_error is not None:
            return None
        if self.segmenter is None:
            try:
                self.segmenter = Segmenter(reference.schema, reference, self.spec.segment, self.spec.segment_values)
            except ValueError as exc:
                self.segment_error = str(exc)
                log.warning("drift %s: no segments: %s", self.route, exc)
                return None
        return self.segmenter.of(rows)

    def _probabilities(self, outputs: list[Tensor]) -> np.ndarray | None:
        if self.truth is None:
            return None
        tensor = next((t for t in outputs if t.name == self.truth.output), None)
        if tensor is None or tensor.values.dtype == object or tensor.values.ndim != 2 or tensor.values.shape[1] < 2:
            return None
        probabilities = tensor.values.astype(np.float64)
        if not np.isfinite(probabilities).all():  # a NaN input may give NaN probabilities: no estimate from them
            return None
        return probabilities

    def close(self, key: Key, index: int, counts: WindowCounts, reference: Reference | None) -> None:
        """Close ``key``'s quality window with its drift window (``counts``) and publish the result."""
        if reference is None:  # windows are only opened once there is a reference
            return
        schema = reference.schema
        with self._lock:
            window = self._open.pop(key, _Window())
            found = window.blanks if window.blanks is not None else np.zeros(len(schema.categorical), np.int64)
            data = data_quality(schema, reference, counts, found, self.spec.data_quality)
            expected = window.expected
            if expected is not None:
                expected.flush()
            accuracy = expected.accuracy() if expected is not None else float("nan")
            streak, needed = 0, self.truth.target_windows if self.truth is not None else 0
            target = self.truth.target if self.truth is not None else None
            if target is not None and accuracy == accuracy:
                streak = self._streak.get(key, 0) + 1 if accuracy < target else 0
                self._streak[key] = streak
            segments: tuple[SegmentResult, ...] = ()
            gaps = None
            if self.segmenter is not None and expected is not None and expected.segments == len(self.segmenter):
                segments, gaps = summarize(self.segmenter.names, expected, self._realized_latest.get(key))
            rows = int(expected.rows.sum()) if expected is not None else 0
            self.latest[key] = QualityWindow(
                key[0], key[1], index, rows, accuracy,
                expected.f1() if expected is not None else float("nan"),
                rows > 0 and window.calibrated_rows == rows,
                target is not None and streak >= needed, streak,
                data, segments, gaps,
            )  # fmt: skip

    def retire(self, key: Key) -> None:
        with self._lock:
            for kept in (self._open, self._labelled, self.calibrators, self._realized, self._realized_latest,
                         self._streak, self.latest):  # fmt: skip
                kept.pop(key, None)

    # --- outcomes (event loop) --------------------------------------------------------------------------------

    def joined(self, request_id: str, key: Key, truth: list) -> None:
        """An outcome joined its prediction (the ground-truth store calls it): calibration rows, realized segments."""
        assert self.truth is not None
        with self._lock:
            self._join(request_id, key, truth)

    def _join(self, request_id: str, key: Key, truth: list) -> None:
        assert self.truth is not None
        wanted = self.spec.segment is not None or (self.truth.calibration > 0 and key not in self.calibrators)
        entry = self._pending.pop(request_id, None)
        if entry is None:
            if wanted:  # its call may not be observed yet: joined when it is
                self._early[request_id] = (key, truth)
                while len(self._early) > self.truth.max_pending:
                    self._early.popitem(last=False)
            return
        if entry[0] != key:
            return
        _, probabilities, segments = entry
        k = probabilities.shape[1]
        labels = np.array([int(t) if str(t).isdigit() and int(t) < k else -1 for t in truth], np.int64)
        known = labels >= 0
        if key not in self.calibrators and self.truth.calibration > 0:
            self._calibrate(key, probabilities[known], labels[known])
        if segments is not None and self.segmenter is not None:
            realized = self._realized.setdefault(key, Realized.empty(len(self.segmenter)))
            realized.add(segments[known], np.argmax(probabilities[known], axis=1) == labels[known])
            if realized.rows.sum() >= self.truth.window:
                self._realized_latest[key] = realized
                self._realized[key] = Realized.empty(len(self.segmenter))

    def _calibrate(self, key: Key, probabilities: np.ndarray, labels: np.ndarray) -> None:
        assert self.truth is not None
        labelled = self._labelled.setdefault(key, [])
        labelled.append((probabilities, labels))
        if sum(len(y) for _, y in labelled) >= self.truth.calibration:
            p = np.concatenate([p for p, _ in labelled]).astype(np.float64)
            y = np.concatenate([y for _, y in labelled])
            self.calibrators[key] = Calibrator.fit(p, y)
            del self._labelled[key]
            log.info("drift %s: %s v%s calibrated on %d labelled rows", self.route, key[0], key[1], len(y))

    # --- what the outside sees --------------------------------------------------------------------------------

    def snapshot(self) -> dict[Key, QualityWindow]:
        with self._lock:
            return dict(self.latest)

    def calibration(self) -> dict[Key, int]:
        """Labelled rows per model version: fitted (the calibration's rows) or still gathering."""
        with self._lock:
            done = {key: c.rows for key, c in self.calibrators.items()}
            gathering = {key: sum(len(y) for _, y in rows) for key, rows in self._labelled.items()}
        return gathering | done

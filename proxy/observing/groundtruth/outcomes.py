"""Ground truth: predictions kept until their outcome is reported, and model quality per version and window.

The drift engine's worker ``remember``s each call's predictions (one per row) under its request id. An outcome
(``ReportOutcome`` over gRPC, or ``POST /outcomes``) ``report``ed for that id is joined with them and counted into
the quality window of the prediction's model version; every ``window`` joined rows the window closes:

- classification (predictions and outcomes compared as text): accuracy = correct / rows; per class c,
  precision_c = TP/(TP+FP), recall_c = TP/(TP+FN), F1_c = 2·P·R/(P+R) (0 when a denominator is 0), and
  precision, recall, F1 are their unweighted means over the classes seen in predictions or outcomes (macro);
- regression: MAE = mean |y - ŷ|, RMSE = sqrt(mean (y - ŷ)^2).

Outcomes that cannot be joined are counted: ``unknown`` (never seen), ``late`` (its prediction expired after
``ttl`` or was pushed out by ``max_pending``), ``duplicate`` (already joined), ``invalid`` (not one value per row,
or not numbers for regression). An outcome reported before its prediction waits in the feedback service's park
(proxy/observing/groundtruth/park.py): ``remember`` joins it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from mlmirror.config import GroundTruth
from mlmirror.observing.drift.versions import RecentKeys
from mlmirror.protocol.kserve import Tensor, TensorError

if TYPE_CHECKING:
    from mlmirror.observing.groundtruth.park import OutcomePark

__all__ = ["OUTCOME_RESULTS", "GroundTruthStore", "OutcomeSnapshot", "QualityResult"]

OUTCOME_RESULTS = ("matched", "unknown", "late", "duplicate", "invalid")


@dataclass(frozen=True, slots=True)
class QualityResult:
    """One closed quality window of a model version."""

    model: str
    version: str
    index: int
    rows: int
    metrics: dict[str, float]
    ended: float


class GroundTruthStore:
    """Predictions waiting for outcomes, and the quality windows they feed. Thread-safe (worker and event loop)."""

    def __init__(
        self,
        spec: GroundTruth,
        history: int = 20,
        *,
        max_versions: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_versions``: (model, version) windows kept at once (the least recently joined is retired);
        ``clock``: seconds, for ``ttl`` (monotonic; tests pass their own)."""
        self.spec = spec
        self._clock = clock
        self._versions: RecentKeys[tuple[str, str]] = RecentKeys(max_versions)
        self._pending: OrderedDict[str, tuple[tuple[str, str], list, float]] = OrderedDict()
        self._gone: OrderedDict[str, bool] = OrderedDict()  # expired (False) or joined (True) ids, bounded
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[tuple[list, list]]] = {}
        self._closed: dict[tuple[str, str], int] = {}
        self.latest: dict[tuple[str, str], QualityResult] = {}
        self.history: deque[QualityResult] = deque(maxlen=history)
        self.results: dict[str, int] = dict.fromkeys(OUTCOME_RESULTS, 0)
        #: called with (request id, key, outcomes) for each joined outcome, under the store's lock (drift.quality)
        self.joined: Callable[[str, tuple[str, str], list], None] | None = None
        #: outcomes that came before their prediction (set by the feedback service): ``remember`` joins them
        self.park: OutcomePark | None = None

    # --- predictions (worker thread) --------------------------------------------------------------------------

    def predictions(self, outputs: Sequence[Tensor]) -> list:
        """The per-row predictions in a call's outputs; raises ``TensorError`` when the output is not there."""
        tensor = next((t for t in outputs if t.name == self.spec.output), None)
        if tensor is None:
            raise TensorError("missing_tensor", f"no output {self.spec.output!r} for ground truth")
        values = tensor.values.reshape(tensor.values.shape[0] if tensor.values.ndim else 1, -1)
        if self.spec.task == "regression":
            if values.dtype == object or values.shape[1] != 1:
                raise TensorError("shape_mismatch", f"{self.spec.output}: regression needs one number per row")
            return values[:, 0].astype(np.float64).tolist()
        if values.shape[1] > 1 and values.dtype != object:
            return [str(i) for i in values.argmax(axis=1).tolist()]
        return [_text(v) for v in values[:, 0].tolist()]

    def remember(self, request_id: str, key: tuple[str, str], predictions: list) -> None:
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._pending[request_id] = (key, predictions, now + self.spec.ttl)
            self._pending.move_to_end(request_id)
            while len(self._pending) > self.spec.max_pending:
                old, _ = self._pending.popitem(last=False)
                self._forget(old, joined=False)
        early = self.park.claim(request_id) if self.park is not None else None  # after the id is known: no race
        if early is not None:
            self.report(request_id, *early)

    def _expire(self, now: float) -> None:
        while self._pending:
            request_id, (_, _, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                return
            self._pending.popitem(last=False)
            self._forget(request_id, joined=False)

    def _forget(self, request_id: str, *, joined: bool) -> None:
        self._gone[request_id] = joined
        while len(self._gone) > self.spec.max_pending:
            self._gone.popitem(last=False)

    # --- outcomes (event loop) --------------------------------------------------------------------------------

    def knows(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._pending or request_id in self._gone

    def report(self, request_id: str, values: Sequence[float], labels: Sequence[str]) -> str:
        """Join one outcome with its prediction; returns one of ``OUTCOME_RESULTS``."""
        with self._lock:
            self._expire(self._clock())
            entry = self._pending.pop(request_id, None)
            if entry is None:
                result = (
                    "unknown" if request_id not in self._gone else ("duplicate" if self._gone[request_id] else "late")
                )
            else:
                key, predictions, _ = entry
                truth = list(values) if self.spec.task == "regression" else [str(v) for v in labels or values]
                if len(truth) != len(predictions) or (self.spec.task == "regression" and labels):
                    result = "invalid"
                else:
                    result = "matched"
                    self._add(key, predictions, truth)
                    if self.joined is not None:
                        self.joined(request_id, key, truth)
                self._forget(request_id, joined=True)
            self.results[result] += 1
            return result

    def retire(self, key: tuple[str, str]) -> None:
        """Forget the quality windows of ``key`` (the drift engine no longer tracks that model version)."""
        with self._lock:
            self._versions.discard(key)
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        self._windows.pop(key, None)
        self._closed.pop(key, None)
        self.latest.pop(key, None)

    def _add(self, key: tuple[str, str], predictions: list, truth: list) -> None:
        retired = self._versions.see(key)
        if retired is not None:
            self._drop(retired)
        window = self._windows.setdefault(key, [])
        window.append((predictions, truth))
        rows = sum(len(p) for p, _ in window)
        if rows >= self.spec.window:
            predicted = [p for pair in window for p in pair[0]]
            actual = [t for pair in window for t in pair[1]]
            index = self._closed.get(key, 0)
            result = QualityResult(key[0], key[1], index, rows, self._metrics(predicted, actual), time.time())
            self._closed[key] = index + 1
            self.latest[key] = result
            self.history.append(result)
            self._windows[key] = []

    def _metrics(self, predicted: list, actual: list) -> dict[str, float]:
        if self.spec.task == "regression":
            error = np.asarray(actual, dtype=np.float64) - np.asarray(predicted, dtype=np.float64)
            return {"mae": float(np.mean(np.abs(error))), "rmse": float(math.sqrt(np.mean(error**2)))}
        return classification_metrics(predicted, actual)

    def snapshot(self) -> OutcomeSnapshot:
        with self._lock:
            return {
                "latest": dict(self.latest),
                "history": list(self.history),
                "results": dict(self.results),
                "pending": len(self._pending),
                "open_rows": {k: sum(len(p) for p, _ in w) for k, w in self._windows.items()},
            }


class OutcomeSnapshot(TypedDict):
    """A consistent copy of a store's state (``GroundTruthStore.snapshot``); keys (model, version)."""

    latest: dict[tuple[str, str], QualityResult]
    history: list[QualityResult]
    results: dict[str, int]  # outcome -> reports
    pending: int  # predictions waiting for their outcome
    open_rows: dict[tuple[str, str], int]  # rows in the window not yet closed


def classification_metrics(predicted: Sequence[str], actual: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 (see the module docstring)."""
    classes = sorted(set(predicted) | set(actual))
    precision, recall, f1 = [], [], []
    for c in classes:
        tp = sum(1 for p, a in zip(predicted, actual, strict=True) if p == c and a == c)
        fp = sum(1 for p, a in zip(predicted, actual, strict=True) if p == c and a != c)
        fn = sum(1 for p, a in zip(predicted, actual, strict=True) if p != c and a == c)
        p_c = tp / (tp + fp) if tp + fp else 0.0
        r_c = tp / (tp + fn) if tp + fn else 0.0
        precision.append(p_c)
        recall.append(r_c)
        f1.append(2 * p_c * r_c / (p_c + r_c) if p_c + r_c else 0.0)
    correct = sum(1 for p, a in zip(predicted, actual, strict=True) if p == a)
    return {
        "accuracy": correct / len(actual) if actual else math.nan,
        "precision": float(np.mean(precision)) if classes else math.nan,
        "recall": float(np.mean(recall)) if classes else math.nan,
        "f1": float(np.mean(f1)) if classes else math.nan,
    }


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

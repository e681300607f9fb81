"""Label-free performance estimation of a classifier (confidence-based, as NannyML's CBPE), numpy only.

A call's prediction is the argmax of its probability output ``p`` ([rows, k]). If the probabilities are calibrated
(``P(y = c | p) = p_c``), the expected confusion counts of a window follow from them alone, with no labels:

- expected accuracy = (1/n) Σ_i p̂_i[ŷ_i], with ŷ_i = argmax_c p_i[c];
- per class c: E[TP_c] = Σ_{i: ŷ_i = c} p̂_i[c], E[FP_c] = Σ_{i: ŷ_i = c} (1 - p̂_i[c]), E[FN_c] = Σ_{i: ŷ_i ≠ c} p̂_i[c];
  F1_c = 2·E[TP_c] / (2·E[TP_c] + E[FP_c] + E[FN_c]) (0 when that is 0), and macro F1 = the mean over the k classes.

``p̂`` are the probabilities after calibration: per class c, an isotonic (monotone, pool-adjacent-violators) map of
``p_c`` to the indicator ``y = c``, fitted on a labelled reference, then each row renormalised to sum to 1 (NannyML's
multiclass scheme). Without a labelled reference ``p̂ = p``: the model is assumed calibrated. Estimates are sums,
so a window holds O(segments · k) numbers, never rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FLUSH_ROWS", "Calibrator", "Expected", "isotonic_fit"]

#: Rows an ``Expected`` buffers before summing them (at most FLUSH_ROWS · k · 2 floats waiting).
FLUSH_ROWS = 1024


def isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators), as knots ``(xs, ys)`` to
    interpolate linearly between (and clip beyond), as scikit-learn's ``IsotonicRegression`` predicts."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    # Equal x values are one point (their mean), so a tie never splits across blocks.
    ux, start = np.unique(x, return_index=True)
    weight = np.diff(np.append(start, x.size)).astype(np.float64)
    total = np.add.reduceat(y, start)
    values: list[float] = []
    weights: list[float] = []
    lows: list[int] = []
    for i in range(ux.size):
        value, w, low = total[i] / weight[i], weight[i], i
        while values and values[-1] >= value:  # pool with the previous block while it violates the order
            previous, pw = values.pop(), weights.pop()
            value = (previous * pw + value * w) / (pw + w)
            w += pw
            low = lows.pop()
        values.append(value)
        weights.append(w)
        lows.append(low)
    highs = [*(low - 1 for low in lows[1:]), ux.size - 1]
    xs = np.array([ux[i] for low, high in zip(lows, highs, strict=True) for i in (low, high)])
    ys = np.repeat(np.asarray(values), 2)
    return xs, ys


@dataclass(frozen=True)
class Calibrator:
    """Per-class isotonic maps of probabilities to outcome frequencies (see the module docstring)."""

    knots: tuple[tuple[np.ndarray, np.ndarray], ...]
    rows: int

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray) -> Calibrator:
        """From ``probabilities`` [rows, k] and their true class indices ``labels`` [rows] (0 .. k-1)."""
        probabilities = np.asarray(probabilities, np.float64)
        if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],) or not probabilities.shape[0]:
            raise ValueError(f"need [rows, k] probabilities and one label per row, got {probabilities.shape}")
        k = probabilities.shape[1]
        return cls(
            tuple(isotonic_fit(probabilities[:, c], (labels == c).astype(np.float64)) for c in range(k)),
            probabilities.shape[0],
        )

    @property
    def classes(self) -> int:
        return len(self.knots)

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [rows, k] (a row the maps send to all zeros keeps its own)."""
        p = np.asarray(probabilities, np.float64)
        calibrated = np.stack([np.interp(p[:, c], xs, ys) for c, (xs, ys) in enumerate(self.knots)], axis=1)
        total = calibrated.sum(axis=1, keepdims=True)
        return np.where(total > 0, calibrated / np.where(total > 0, total, 1.0), p)


@dataclass
class Expected:
    """Expected confusion counts of a window, per segment (axis 0; one segment when none is configured)."""

    segments: int
    classes: int
    rows: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    predicted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        s, k = self.segments, self.classes
        self.rows = np.zeros(s, np.int64)
        self.correct = np.zeros(s)
        self.tp, self.fp, self.fn = np.zeros((s, k)), np.zeros((s, k)), np.zeros((s, k))
        self.predicted = np.zeros((s, k), np.int64)
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0

    def add(self, probabilities: np.ndarray, calibrated: np.ndarray, segments: np.ndarray | None = None) -> None:
        """Count rows: raw ``probabilities`` [rows, k] decide the prediction, ``calibrated`` ones the expectations;
        ``segments`` [rows] the segment index of each row (all 0 when None). Rows are buffered and summed
        ``FLUSH_ROWS`` at a time (numpy costs per call, not per row); reading a figure sums what is buffered."""
        n = probabilities.shape[0]
        self._buffer.append((probabilities, calibrated, np.zeros(n, np.int64) if segments is None else segments))
        self._buffered += n
        if self._buffered >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        probabilities = np.concatenate([b[0] for b in self._buffer])
        calibrated = np.concatenate([b[1] for b in self._buffer])
        seg = np.concatenate([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        n = probabilities.shape[0]
        predicted = np.argmax(probabilities, axis=1)
        hit = np.zeros_like(calibrated, dtype=bool)
        hit[np.arange(n), predicted] = True
        s = self.segments
        self.rows += np.bincount(seg, minlength=s)
        self.correct += np.bincount(seg, weights=calibrated[np.arange(n), predicted], minlength=s)
        for c in range(self.classes):
            self.tp[:, c] += np.bincount(seg, weights=np.where(hit[:, c], calibrated[:, c], 0.0), minlength=s)
            self.fp[:, c] += np.bincount(seg, weights=np.where(hit[:, c], 1.0 - calibrated[:, c], 0.0), minlength=s)
            self.fn[:, c] += np.bincount(seg, weights=np.where(hit[:, c], 0.0, calibrated[:, c]), minlength=s)
            self.predicted[:, c] += np.bincount(seg, weights=hit[:, c], minlength=s).astype(np.int64)

    def accuracy(self, segment: int | None = None) -> float:
        """Expected accuracy of one segment, or of all rows (None); NaN without rows."""
        self.flush()
        rows = self.rows.sum() if segment is None else self.rows[segment]
        correct = self.correct.sum() if segment is None else self.correct[segment]
        return float(correct / rows) if rows else float("nan")

    def f1(self, segment: int | None = None) -> float:
        """Expected macro F1 over the k classes; NaN without rows."""
        self.flush()
        pick = slice(None) if segment is None else slice(segment, segment + 1)
        tp, fp, fn = (a[pick].sum(axis=0) for a in (self.tp, self.fp, self.fn))
        if not self.rows[pick].sum():
            return float("nan")
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return float(f1.mean())

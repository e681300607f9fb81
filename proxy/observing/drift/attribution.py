"""Feature-attribution drift: does the model still rely on the same features as in the reference?

Per window, an importance per input feature, from either

- an attribution output the model returns (``attribution.output``, one column per feature, in the order of the
  route's numeric features): importance_j = mean |a_j| over the window's rows; or
- a standardized linear surrogate, computed off the critical path from mergeable sums: the least-squares fit of the
  ``target`` output series on the numeric features over the window's rows (rows with a non-finite value skipped),
  importance_j = |beta_j| * sd(x_j) / sd(y) — the change in the target, in its standard deviations, per standard
  deviation of feature j. The sums (n, Σx, Σxxᵀ, Σy, Σxy, Σy²) add across batches, so no row is kept.

The window's ranking is compared with the reference's by NDCG, with the reference importances as relevance (as
SageMaker Clarify does): ``DCG = Σ_i rel(f_i) / log2(i + 1)`` over features ``f_1, f_2, ...`` ordered by the
window's importance, ``NDCG = DCG / IDCG`` (IDCG: ordered by the reference's own). 1 means the same ranking;
attribution drift is flagged below ``threshold`` (0.9 by default, SageMaker's alert).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from mlmirror.config.schema_observing import Attribution
from mlmirror.observing.drift.schema import Schema
from mlmirror.observing.drift.scoring import AttributionResult

__all__ = ["AttributionState", "AttributionTracker", "ndcg", "tracker_for"]

log = logging.getLogger(__name__)


@dataclass
class AttributionState:
    """Mergeable sums of one window (or of the reference)."""

    n: float
    sx: np.ndarray
    sxx: np.ndarray
    sy: float
    sxy: np.ndarray
    syy: float
    abs_sum: np.ndarray


class AttributionTracker:
    """Importances of ``features`` (columns of the numeric rows) from ``sources`` columns: the target series (one
    column, surrogate mode) or the attribution series (one per feature)."""

    def __init__(self, features: list[int], sources: list[int], surrogate: bool, threshold: float) -> None:
        self.features = features
        self.sources = sources
        self.surrogate = surrogate
        self.threshold = threshold
        #: the reference's importances (from the captured reference; a profile has none: the first window's)
        self.baseline: np.ndarray | None = None

    def new_state(self) -> AttributionState:
        k = len(self.features)
        return AttributionState(0.0, np.zeros(k), np.zeros((k, k)), 0.0, np.zeros(k), 0.0, np.zeros(len(self.sources)))

    def add(self, state: AttributionState, numeric: np.ndarray) -> None:
        """Add a batch of numeric rows ([rows, numeric series])."""
        if self.surrogate:
            x = numeric[:, self.features]
            y = numeric[:, self.sources[0]]
            keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
            x, y = x[keep], y[keep]
            state.n += x.shape[0]
            state.sx += x.sum(axis=0)
            state.sxx += x.T @ x
            state.sy += float(y.sum())
            state.sxy += x.T @ y
            state.syy += float(y @ y)
        else:
            a = np.abs(numeric[:, self.sources])
            keep = np.isfinite(a).all(axis=1)
            state.n += int(keep.sum())
            state.abs_sum += a[keep].sum(axis=0)

    def importance(self, state: AttributionState) -> np.ndarray:
        """Per-feature importance (NaN when the window cannot say: too few rows, or a constant target)."""
        k = len(self.features)
        if not self.surrogate:
            return state.abs_sum / state.n if state.n else np.full(k, math.nan)
        n = state.n
        if n <= k + 1:
            return np.full(k, math.nan)
        mean_x = state.sx / n
        cov_xx = state.sxx / n - np.outer(mean_x, mean_x)
        cov_xy = state.sxy / n - mean_x * (state.sy / n)
        var_y = state.syy / n - (state.sy / n) ** 2
        if var_y <= 0:
            return np.full(k, math.nan)
        beta = np.linalg.lstsq(cov_xx, cov_xy, rcond=None)[0]
        sigma_x = np.sqrt(np.clip(np.diag(cov_xx), 0.0, None))
        return np.abs(beta) * sigma_x / math.sqrt(var_y)

    def result(self, state: AttributionState, names: list[str]) -> AttributionResult:
        """The window's importances (per feature name) ranked against the baseline by NDCG."""
        importance = self.importance(state)
        if self.baseline is None:
            self.baseline = importance
        score = ndcg(self.baseline, importance)
        return AttributionResult(
            importance=dict(zip(names, importance.tolist(), strict=True)),
            reference=dict(zip(names, self.baseline.tolist(), strict=True)),
            ndcg=score,
            drifted=bool(score < self.threshold),
        )


def tracker_for(spec: Attribution, schema: Schema, route: str) -> AttributionTracker | None:
    """The tracker ``spec`` asks for over ``schema``'s numeric series; None (logged) when the series do not fit."""
    numeric = schema.numeric
    features = [i for i, s in enumerate(numeric) if s.kind == "feature"]
    outputs = [i for i, s in enumerate(numeric) if s.kind == "output"]
    if spec.output is not None:
        sources = [i for i in outputs if numeric[i].tensor == spec.output]
        surrogate = False
    elif spec.target is not None:
        sources = [i for i in outputs if numeric[i].name == spec.target]
        surrogate = True
    else:
        sources, surrogate = outputs[:1], True
    if not features or not sources or (not surrogate and len(sources) != len(features)):
        need = "a numeric target" if surrogate else f"one column per feature in {spec.output!r}"
        log.warning("drift %s: attribution needs numeric features and %s; it is off", route, need)
        return None
    return AttributionTracker(features, sources, surrogate, spec.threshold)


def ndcg(reference: np.ndarray, current: np.ndarray) -> float:
    """NDCG of the ranking by ``current`` with ``reference`` as relevance (NaN when either has a NaN or the
    reference is all zero). Ties in ``current`` are broken by feature order."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if not (np.isfinite(reference).all() and np.isfinite(current).all()) or not reference.any():
        return math.nan
    discounts = 1.0 / np.log2(np.arange(2, reference.size + 2))
    dcg = float(np.sum(reference[np.argsort(-current, kind="stable")] * discounts))
    ideal = float(np.sum(np.sort(reference)[::-1] * discounts))
    return dcg / ideal

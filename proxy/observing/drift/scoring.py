"""What a drift window's scores are made of: the result records a closed window publishes, and the scoring of
window counts against reference counts by every configured method (the Numba kernels; see docs/DRIFT.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from mlmirror.kernels.methods import DEFAULT_CATEGORICAL, DEFAULT_NUMERIC, DRIFT_METHODS
from mlmirror.observing.drift.reference import WindowCounts
from mlmirror.observing.drift.schema import Rows

__all__ = [
    "AttributionResult",
    "EngineSnapshot",
    "MultivariateResult",
    "SeriesResult",
    "WindowResult",
    "concat",
    "score_counts",
    "sum_counts",
]

#: Methods whose score is a p-value (drifted below the threshold); the others are distances (drifted above).


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """One series in one window: ``scores`` by method (p-values for ks and chi2), and whether it drifted by the
    route's ``detect`` method (``chi2`` standing in for ``ks`` on categorical series).

    With a family-wise ``alarm_level``: ``p_value`` is the detecting method's p-value (a distance's from the
    reference's bootstrap), ``adjusted`` its Holm-adjusted value over the window's series, and ``drifted`` means
    ``adjusted <= alarm_level`` (and, for a distance, its score above ``threshold``). Both NaN without a level.
    """

    name: str
    kind: str
    categorical: bool
    scores: dict[str, float]
    method: str
    drifted: bool
    nan: int
    threshold: float = math.nan
    p_value: float = math.nan
    adjusted: float = math.nan


@dataclass(frozen=True, slots=True)
class AttributionResult:
    """Feature importances of a window and of the reference, and the NDCG of the window's ranking."""

    importance: dict[str, float]
    reference: dict[str, float]
    ndcg: float
    drifted: bool


@dataclass(frozen=True, slots=True)
class MultivariateResult:
    """PCA reconstruction error of a window, the reference's, and the calibrated upper bound."""

    error: float
    reference: float
    upper: float
    drifted: bool


@dataclass(frozen=True, slots=True)
class WindowResult:
    """A closed window of one model version."""

    route: str
    model: str
    version: str
    index: int
    calls: int
    rows: int
    started: float
    ended: float
    series: tuple[SeriesResult, ...]
    attribution: AttributionResult | None = None
    multivariate: MultivariateResult | None = None
    #: series drifted in ``m`` of the last ``n`` windows (``drift.persistence``; without it, those drifted now)
    persistent: frozenset[str] = frozenset()

    @property
    def drifted(self) -> bool:
        """The window's decision: some series drifted (family-wise controlled at ``drift.alarm_level``)."""
        return any(s.drifted for s in self.series)

    @property
    def feature_drift_share(self) -> float:
        """Share of input features that drifted (data drift); NaN without features."""
        features = [s for s in self.series if s.kind == "feature"]
        return sum(s.drifted for s in features) / len(features) if features else math.nan

    @property
    def drifted_outputs(self) -> list[str]:
        return [s.name for s in self.series if s.kind == "output" and s.drifted]


class EngineSnapshot(TypedDict):
    """A consistent copy of an engine's results (``DriftEngine.snapshot``); keys (model, version)."""

    latest: dict[tuple[str, str], WindowResult]
    history: list[WindowResult]
    windows: dict[tuple[str, str], int]
    decode_errors: dict[str, int]
    sliding: dict[tuple[str, str], WindowResult]
    counts: dict[tuple[str, str], WindowCounts]


def sum_counts(windows: list[WindowCounts]) -> WindowCounts:
    """The counts of several windows together (counts merge by addition)."""
    first = windows[0]
    return WindowCounts(
        numeric=sum((w.numeric for w in windows), np.zeros_like(first.numeric)),
        categorical=[
            sum((w.categorical[j] for w in windows), np.zeros_like(c)) for j, c in enumerate(first.categorical)
        ],
        calls=sum(w.calls for w in windows),
        rows=sum(w.rows for w in windows),
    )


def concat(groups: list[Rows]) -> Rows:
    if len(groups) == 1:
        return groups[0]
    return Rows(np.concatenate([g.numeric for g in groups]), np.concatenate([g.categorical for g in groups]))


def score_counts(
    reference: np.ndarray,
    current: np.ndarray,
    methods: tuple[str, ...],
    positions: np.ndarray | None,
    *,
    categorical: bool,
) -> dict[str, np.ndarray]:
    """Each method's score per row of the [series, K] count arrays (p-values for ks and chi2)."""
    if reference.ndim == 1:
        reference, current = reference[None, :], current[None, :]
    wanted = set(methods) | {DEFAULT_CATEGORICAL if categorical else DEFAULT_NUMERIC}
    if reference.shape[0] == 0:
        return {m: np.empty(0) for m in wanted}
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        method = DRIFT_METHODS[name]
        if method.applies_to(categorical=categorical) and (positions is not None or not method.needs_positions):
            out[name] = method.score(reference, current, positions)
    return out

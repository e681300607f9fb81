"""What a drift window is called: each series scored by every configured method against the reference, and judged
drifted by its detecting method.

The detecting method is ``drift.detect`` where it applies to the series (numeric or categorical), otherwise the
default for that kind of series. With ``drift.alarm_level`` (default 0.01) the window's series are judged as one
family: each gets the p-value of its detecting method (a distance's from a bootstrap of the reference, see
``family``), Holm's correction adjusts them, and a series is drifted when its adjusted p-value is at most the level
(a distance must also pass its threshold, a floor on the size of the change). The chance that a healthy window calls
any series drifted is then at most the level. With ``alarm_level: off`` each series is judged alone against its
threshold. Calibration (``drift.calibrate: k``) sets one distance threshold per series and method: mean + k sd of
the scores of window-sized chunks of the reference, each scored against the rest of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from mlmirror.config import Drift
from mlmirror.kernels.methods import DEFAULT_CATEGORICAL, DEFAULT_NUMERIC, DRIFT_METHODS
from mlmirror.observing.drift.family import NullScores, bootstrap_draws, holm
from mlmirror.observing.drift.persistence import PersistenceTracker
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows, Schema
from mlmirror.observing.drift.scoring import SeriesResult, WindowResult, score_counts

__all__ = ["Judge"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Scored:
    """One series' scores, with what its p-value needs: its base counts (one series' slots) and window rows."""

    name: str
    kind: str
    categorical: bool
    scores: dict[str, float]
    nan: int
    base: np.ndarray
    rows: int
    positions: np.ndarray | None


class Judge:
    """Scores and judges the series of one route's windows; ``calibrated`` holds the per-series thresholds,
    ``persistence`` the recent windows' drifted series."""

    def __init__(self, route: str, spec: Drift) -> None:
        self.route = route
        self.spec = spec
        #: (series name, method) -> distance threshold from the reference's own chunks
        self.calibrated: dict[tuple[str, str], float] = {}
        self.nulls = NullScores()
        self.persistence = PersistenceTracker(spec.persistence)

    def series(
        self, reference: Reference, schema: Schema, counts: WindowCounts, against: WindowCounts | None = None
    ) -> list[SeriesResult]:
        """Every series of ``counts`` scored against the reference (or against ``against``, in the reference's
        bins) and judged."""
        scored = self.scores(reference, schema, counts, against)
        if self.spec.alarm_level is None:
            return [self.judge(s.name, s.kind, s.categorical, s.scores, s.nan) for s in scored]
        return self._judge_family(scored, self.spec.alarm_level)

    def scores(
        self, reference: Reference, schema: Schema, counts: WindowCounts, against: WindowCounts | None
    ) -> list[_Scored]:
        """Every series of ``counts`` scored by every configured method against the reference (or ``against``),
        not judged (calibration reads these)."""
        base = against if against is not None else reference.counts
        methods = self.spec.methods
        results: list[_Scored] = []
        reference_bins = base.numeric_distribution()
        window_bins = counts.numeric_distribution()
        numeric = score_counts(reference_bins, window_bins, methods, reference.positions, categorical=False)
        for j, series in enumerate(schema.numeric):
            scores = {m: float(v[j]) for m, v in numeric.items()}
            where = None if reference.positions is None else reference.positions[j]
            rows = round(float(window_bins[j].sum()))
            results.append(_Scored(series.name, series.kind, False, scores, int(counts.numeric[j, -1]),
                                   reference_bins[j], rows, where))  # fmt: skip
        for j, series in enumerate(schema.categorical):
            ref = base.categorical[j].astype(np.float64)
            cur = counts.categorical[j].astype(np.float64)
            scores = {m: float(v[0]) for m, v in score_counts(ref, cur, methods, None, categorical=True).items()}
            rows = round(float(cur.sum()))
            results.append(_Scored(series.name, series.kind, True, scores, 0, ref.reshape(-1), rows, None))
        return results

    def _method(self, categorical: bool) -> str:
        method = self.spec.detect
        if ("categorical" if categorical else "numeric") not in DRIFT_METHODS[method].detects:
            method = DEFAULT_CATEGORICAL if categorical else DEFAULT_NUMERIC
        return method

    def judge(self, name: str, kind: str, categorical: bool, scores: dict[str, float], nan: int) -> SeriesResult:
        """The series' result judged alone (``alarm_level: off``): drifted when its detecting method's score passes
        the threshold (never on NaN)."""
        method = self._method(categorical)
        value = scores.get(method, math.nan)
        threshold = self.calibrated.get((name, method), self.spec.threshold(method))
        drifted = DRIFT_METHODS[method].drifted(value, threshold) and not math.isnan(value)
        return SeriesResult(name, kind, categorical, scores, method, drifted, nan, threshold)

    def _judge_family(self, scored: list[_Scored], level: float) -> list[SeriesResult]:
        """The series judged together: Holm over their p-values at ``level``; a distance must also pass its
        threshold."""
        draws = bootstrap_draws(len(scored), level)
        p_values: list[float] = []
        for s in scored:
            method = self._method(s.categorical)
            value = s.scores.get(method, math.nan)
            if DRIFT_METHODS[method].p_value:
                p_values.append(value)
            else:
                p_values.append(self.nulls.p_value(s.name, method, s.base, s.rows, value, draws, s.positions))
        adjusted = holm(p_values)
        results: list[SeriesResult] = []
        for s, p, a in zip(scored, p_values, adjusted, strict=True):
            method = self._method(s.categorical)
            value = s.scores.get(method, math.nan)
            if DRIFT_METHODS[method].p_value:
                threshold, large = level, True
            else:
                threshold = self.calibrated.get((s.name, method), self.spec.threshold(method))
                large = DRIFT_METHODS[method].drifted(value, threshold)
            drifted = not math.isnan(a) and a <= level and large
            results.append(SeriesResult(s.name, s.kind, s.categorical, s.scores, method, drifted, s.nan, threshold,
                                        p, a))  # fmt: skip
        return results

    def persist(self, key: tuple[str, str], result: WindowResult) -> WindowResult:
        """A closed window's result with its persistent series (``drift.persistence``)."""
        return self.persistence.see(key, result)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop what is kept of a retired model version."""
        self.persistence.forget(key)

    def calibrate(self, reference: Reference, schema: Schema, rows: Rows, size: int) -> None:
        """Per-series distance thresholds from chunks of ``size`` rows of the reference's ``rows`` (needs 3)."""
        k = self.spec.calibrate
        if k is None:
            return
        chunks = rows.numeric.shape[0] // size
        if chunks < 3:
            log.warning("drift %s: calibration needs 3 window-sized chunks of reference, has %d", self.route, chunks)
            return
        scores: dict[tuple[str, str], list[float]] = {}
        full = reference.counts
        for c in range(chunks):
            part = Rows(rows.numeric[c * size : (c + 1) * size], rows.categorical[c * size : (c + 1) * size])
            counts = reference.new_window()
            reference.add(counts, part)
            # Each chunk against the rest of the reference (counts subtract), as a new window would be judged. The
            # reference's own counts never change, so a scrape reading them from another thread sees all of it.
            rest = WindowCounts(
                full.numeric - counts.numeric,
                [a - b for a, b in zip(full.categorical, counts.categorical, strict=True)],
            )
            for result in self.scores(reference, schema, counts, rest):
                for method, value in result.scores.items():
                    scores.setdefault((result.name, method), []).append(value)
        self.calibrated = {
            key: float(np.nanmean(values) + k * np.nanstd(values))
            for key, values in scores.items()
            if not DRIFT_METHODS[key[1]].p_value
        }

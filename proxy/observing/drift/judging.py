"""What a drift window is called: each series scored by every configured method against the reference, and judged
drifted by its detecting method against a threshold (configured, or calibrated on the reference).

The detecting method is ``drift.detect`` where it applies to the series (numeric or categorical), otherwise the
default for that kind of series. Calibration (``drift.calibrate: k``) sets one distance threshold per series and
method: mean + k sd of the scores of window-sized chunks of the reference, each scored against the rest of it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from mlmirror.config import Drift
from mlmirror.kernels.methods import DEFAULT_CATEGORICAL, DEFAULT_NUMERIC, DRIFT_METHODS
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows, Schema
from mlmirror.observing.drift.scoring import SeriesResult, score_counts

__all__ = ["Judge"]

log = logging.getLogger(__name__)


class Judge:
    """Scores and judges the series of one route's windows; ``calibrated`` holds the per-series thresholds."""

    def __init__(self, route: str, spec: Drift) -> None:
        self.route = route
        self.spec = spec
        #: (series name, method) -> distance threshold from the reference's own chunks
        self.calibrated: dict[tuple[str, str], float] = {}

    def series(
        self, reference: Reference, schema: Schema, counts: WindowCounts, against: WindowCounts | None = None
    ) -> list[SeriesResult]:
        """Every series of ``counts`` scored against the reference (or against ``against``, in the reference's
        bins) and judged."""
        base = against if against is not None else reference.counts
        methods = self.spec.methods
        results: list[SeriesResult] = []
        numeric = score_counts(base.numeric_distribution(), counts.numeric_distribution(), methods,
                               reference.positions, categorical=False)  # fmt: skip
        for j, series in enumerate(schema.numeric):
            scores = {m: float(v[j]) for m, v in numeric.items()}
            results.append(self.judge(series.name, series.kind, False, scores, int(counts.numeric[j, -1])))
        for j, series in enumerate(schema.categorical):
            ref = base.categorical[j].astype(np.float64)
            cur = counts.categorical[j].astype(np.float64)
            scores = {m: float(v[0]) for m, v in score_counts(ref, cur, methods, None, categorical=True).items()}
            results.append(self.judge(series.name, series.kind, True, scores, 0))
        return results

    def judge(self, name: str, kind: str, categorical: bool, scores: dict[str, float], nan: int) -> SeriesResult:
        """The series' result: drifted when its detecting method's score passes the threshold (never on NaN)."""
        method = self.spec.detect
        if ("categorical" if categorical else "numeric") not in DRIFT_METHODS[method].detects:
            method = DEFAULT_CATEGORICAL if categorical else DEFAULT_NUMERIC
        value = scores.get(method, math.nan)
        threshold = self.calibrated.get((name, method), self.spec.threshold(method))
        drifted = DRIFT_METHODS[method].drifted(value, threshold) and not math.isnan(value)
        return SeriesResult(name, kind, categorical, scores, method, drifted, nan, threshold)

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
            for result in self.series(reference, schema, counts, against=rest):
                for method, value in result.scores.items():
                    scores.setdefault((result.name, method), []).append(value)
        self.calibrated = {
            key: float(np.nanmean(values) + k * np.nanstd(values))
            for key, values in scores.items()
            if not DRIFT_METHODS[key[1]].p_value
        }

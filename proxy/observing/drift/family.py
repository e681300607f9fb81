"""Family-wise control of a window's drift decisions: Holm's step-down correction over the p-values of the window's
series, and p-values for the distance methods from a parametric bootstrap of the reference.

Holm (not Benjamini-Hochberg): an alert asks "did anything of this healthy window get flagged?", the family-wise
error rate, which Holm bounds by the level under any dependence between the series (features and the outputs that
are computed from them are dependent); BH bounds the expected share of false flags among the flags, a weaker promise.

A distance (PSI, JS, Hellinger, L-infinity, KL, W1) has no p-value of its own. Its null law for a window of ``M``
rows against a reference of ``N`` is simulated: ``draws`` pairs (reference, window) are drawn as multinomials of
``N`` and ``M`` rows from the reference's slot shares (half a count added to every slot, so that a value beyond the
reference's extremes or an unseen category is possible, as it is in real traffic), each pair is scored by the method,
and the p-value of a score ``s`` is ``(1 + #{null >= s}) / (draws + 1)``. Draws are seeded per series and window
size, so a result is reproducible.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
from mlmirror.kernels.methods import DRIFT_METHODS

__all__ = ["NullScores", "bootstrap_draws", "holm"]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (a series is drifted at level ``a`` when its adjusted p-value is <= ``a``); NaN stays
    NaN and is left out of the family."""
    values = [float(p) for p in p_values]
    finite = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    family = len(finite)
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (family - rank) * p))
        adjusted[i] = running
    return adjusted


def bootstrap_draws(family: int, level: float) -> int:
    """Draws per null law: enough that the smallest p-value, ``1 / (draws + 1)``, is a tenth of Holm's first step
    ``level / family`` (at least 2,000, at most 50,000)."""
    return int(min(50_000, max(2_000, math.ceil(10 * family / level))))


class NullScores:
    """Bootstrap null laws of distance scores, kept per (series, method, reference rows, window rows)."""

    MAX_KEPT = 256

    def __init__(self) -> None:
        self._laws: dict[tuple[str, str, int, int, int], np.ndarray] = {}

    def p_value(
        self,
        name: str,
        method: str,
        reference: np.ndarray,
        rows: int,
        score: float,
        draws: int,
        positions: np.ndarray | None = None,
    ) -> float:
        """The bootstrap p-value of ``score`` (method ``method``) for a window of ``rows`` rows against the
        ``reference`` counts (one series' slots); NaN for a NaN score or an empty side."""
        total = round(float(reference.sum()))
        if math.isnan(score) or rows <= 0 or total <= 0:
            return math.nan
        key = (name, method, total, rows, draws)
        law = self._laws.get(key)
        if law is None:
            if len(self._laws) >= self.MAX_KEPT:  # time windows of ever new sizes: start over rather than grow
                self._laws.clear()
            law = self._laws[key] = self._simulate(name, method, reference, total, rows, draws, positions)
        exceed = law.size - int(np.searchsorted(law, score * (1.0 - 1e-12), side="left"))
        return (1.0 + exceed) / (law.size + 1.0)

    @staticmethod
    def _simulate(
        name: str,
        method: str,
        reference: np.ndarray,
        total: int,
        rows: int,
        draws: int,
        positions: np.ndarray | None,
    ) -> np.ndarray:
        shares = np.asarray(reference, dtype=np.float64) + 0.5
        shares /= shares.sum()
        rng = np.random.default_rng([zlib.crc32(f"{name}\0{method}".encode()), total, rows])
        simulated_reference = rng.multinomial(total, shares, size=draws).astype(np.float64)
        simulated_window = rng.multinomial(rows, shares, size=draws).astype(np.float64)
        where = None if positions is None else np.broadcast_to(positions, simulated_reference.shape)
        law = DRIFT_METHODS[method].score(simulated_reference, simulated_window, where)
        return np.sort(law[~np.isnan(law)])

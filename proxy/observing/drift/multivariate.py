"""Multivariate data drift: PCA reconstruction error against the reference, as NannyML does — with sums, not rows.

Fitted on the reference's numeric features (rows with a non-finite value skipped): each feature standardized with
the reference mean and standard deviation (sd 0 counts as 1), then the principal components that together explain
``variance`` of the standardized variance are kept (V, [features, k]). A window's reconstruction error is the mean
squared distance between its standardized rows z and their projection onto those components::

    error = E||z - V Vᵀ z||² = tr(S) - tr(Vᵀ S V),   S = E[z zᵀ] over the window

computed from the window's sums n, Σx, Σxxᵀ (which merge across batches). It rises when the features' joint
structure changes, even when each feature's own distribution does not. The threshold is calibrated on the
reference: its rows split into chunks, each chunk's error computed; drift is flagged above
``mean + k·sd · sqrt(chunk rows / window rows)`` of those (the sd scaled to the window's expected size).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from mlmirror.config.schema_observing import Multivariate
from mlmirror.observing.drift.scoring import MultivariateResult

__all__ = ["PcaDrift", "PcaState", "fit_pca"]

log = logging.getLogger(__name__)

_CHUNKS = 10


@dataclass
class PcaState:
    """Mergeable sums of the numeric features of one window."""

    n: float
    sx: np.ndarray
    sxx: np.ndarray


class PcaDrift:
    """PCA reconstruction error of windows, fitted and calibrated on reference rows ([rows, features])."""

    def __init__(self, reference: np.ndarray, window_rows: float, *, variance: float = 0.65, k: float = 3.0) -> None:
        rows = reference[np.isfinite(reference).all(axis=1)]
        if rows.shape[0] < 2 * _CHUNKS or rows.shape[1] < 2:
            raise ValueError("needs at least 2 numeric features and 20 finite reference rows")
        self.mean = rows.mean(axis=0)
        sd = rows.std(axis=0)
        self.sd = np.where(sd > 0, sd, 1.0)
        z = (rows - self.mean) / self.sd
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(z, rowvar=False, bias=True))
        order = np.argsort(eigenvalues)[::-1]
        share = np.cumsum(eigenvalues[order]) / eigenvalues.sum()
        kept = int(np.searchsorted(share, variance) + 1)
        self.components = eigenvectors[:, order[: min(kept, rows.shape[1])]]
        self.reference_error = self.error(self._sums(rows))
        chunk_errors = [self.error(self._sums(chunk)) for chunk in np.array_split(rows, _CHUNKS)]
        chunk_rows = rows.shape[0] / _CHUNKS
        spread = float(np.std(chunk_errors)) * math.sqrt(chunk_rows / max(window_rows, 1.0))
        self.upper = float(np.mean(chunk_errors)) + k * spread

    def new_state(self) -> PcaState:
        d = self.mean.size
        return PcaState(0.0, np.zeros(d), np.zeros((d, d)))

    def add(self, state: PcaState, x: np.ndarray) -> None:
        x = x[np.isfinite(x).all(axis=1)]
        state.n += x.shape[0]
        state.sx += x.sum(axis=0)
        state.sxx += x.T @ x

    def _sums(self, x: np.ndarray) -> PcaState:
        state = self.new_state()
        self.add(state, x)
        return state

    def error(self, state: PcaState) -> float:
        """Mean squared reconstruction error of the window's standardized rows (NaN without rows)."""
        if state.n == 0:
            return math.nan
        ex = state.sx / state.n
        exx = state.sxx / state.n
        # E[(x - m)(x - m)ᵀ] = E[xxᵀ] - m E[x]ᵀ - E[x] mᵀ + m mᵀ, then scaled by 1/sd on both sides.
        second = exx - np.outer(self.mean, ex) - np.outer(ex, self.mean) + np.outer(self.mean, self.mean)
        s = second / np.outer(self.sd, self.sd)
        v = self.components
        return float(np.trace(s) - np.trace(v.T @ s @ v))

    def result(self, state: PcaState) -> MultivariateResult:
        """The window's reconstruction error against the reference's, flagged above ``upper``."""
        error = self.error(state)
        return MultivariateResult(error, self.reference_error, self.upper, bool(error > self.upper))


def fit_pca(spec: Multivariate, features: np.ndarray, window_rows: float, route: str) -> PcaDrift | None:
    """The multivariate measure of ``spec`` fitted on reference rows of the numeric ``features``; None (logged)
    with fewer than two features or when it cannot be fitted."""
    if features.shape[1] < 2:
        return None
    try:
        return PcaDrift(features, window_rows, variance=spec.variance, k=spec.k)
    except ValueError as exc:
        log.warning("drift %s: no multivariate measure: %s", route, exc)
        return None

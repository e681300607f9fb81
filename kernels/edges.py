"""Bin edges from reference data (plain numpy: computed once per reference profile, not per window)."""

from __future__ import annotations

import numpy as np

__all__ = ["quantile_edges", "uniform_edges"]


def uniform_edges(lo: np.ndarray | float, hi: np.ndarray | float, n_bins: int) -> np.ndarray:
    """Equal-width edges, ``np.linspace(lo[f], hi[f], n_bins + 1)`` per feature ([features, n_bins + 1])."""
    lo = np.atleast_1d(np.asarray(lo, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(hi, dtype=np.float64))
    if n_bins < 1 or lo.shape != hi.shape or not (hi > lo).all():
        raise ValueError("need n_bins >= 1 and hi > lo for every feature")
    return np.stack([np.linspace(a, b, n_bins + 1) for a, b in zip(lo, hi, strict=True)])


def quantile_edges(reference: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges at the reference's quantiles ``0, 1/n, ..., 1`` per column of ``reference`` ([rows, features]),
    ignoring NaN and infinities; ties are merged and a constant column gets one bin ``[x - 0.5, x + 0.5]`` (or the
    floats next to ``x`` where 0.5 is below its precision), then every feature is given ``n_bins + 1`` edges by
    splitting its widest bins (or adding the next float above) — so all features share one shape."""
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim == 1:
        reference = reference[:, None]
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    rows = []
    for column in reference.T:
        finite = column[np.isfinite(column)]
        edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n_bins + 1))) if finite.size else np.zeros(1)
        if edges.size == 1:
            edges = _around(edges[0])
        while edges.size < n_bins + 1:  # merged ties: split the widest bin, or extend, until the shape is uniform
            edges = _one_more_edge(edges)
        rows.append(edges)
    return np.stack(rows)


def _around(x: float) -> np.ndarray:
    """Edges of one bin holding ``x``: ``[x - 0.5, x + 0.5]``, or the neighbouring floats where 0.5 is lost."""
    lo, hi = x - 0.5, x + 0.5
    if not lo < x < hi or not np.isfinite([lo, hi]).all():
        with np.errstate(over="ignore"):
            lo, hi = np.nextafter(x, -np.inf), np.nextafter(x, np.inf)
        if not np.isfinite(hi):  # x is the largest float: the bin [below x, x] (its top edge is closed)
            hi = x
    return np.array([lo, hi])


def _one_more_edge(edges: np.ndarray) -> np.ndarray:
    """``edges`` with one more edge: the middle of the widest bin when it has one, else the next float above the
    top (or below the bottom at the top of the float range)."""
    widths = np.diff(edges / 2)  # halved, so that the widths of huge spans do not overflow
    i = int(np.argmax(widths))
    middle = edges[i] / 2 + edges[i + 1] / 2
    if edges[i] < middle < edges[i + 1]:
        return np.insert(edges, i + 1, middle)
    with np.errstate(over="ignore"):
        above = np.nextafter(edges[-1], np.inf)
    if np.isfinite(above):
        return np.append(edges, above)
    return np.insert(edges, 0, np.nextafter(edges[0], -np.inf))

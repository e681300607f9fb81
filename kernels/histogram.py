"""Histogram updates: Numba kernels (nogil, cached) behind validating wrappers.

Counts are 2-D, one row per feature, ``n_bins + 3`` slots per row::

    slot 0            underflow: x < edges[0] (including -inf)
    slots 1 .. n      bin i covers [edges[i-1], edges[i]); the last bin also takes x == edges[n] (as np.histogram)
    slot n + 1        overflow: x > edges[n] (including +inf)
    slot n + 2        NaN

Values arrive as a [rows, features] float64 array (rows as the model receives them). Updates add to ``counts`` in
place, so windows are merged by adding count arrays. Categorical features are integer codes in [0, V) with anything
else (say -1 for unknown) counted in slot V.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "NAN_SLOT",
    "OVERFLOW_SLOT",
    "UNDERFLOW",
    "edge_guide",
    "new_counts",
    "update_categorical",
    "update_sorted_edges",
    "update_uniform",
]

UNDERFLOW = 0
#: Cells of the lookup table that ``update_sorted_edges`` starts from.
GUIDE_CELLS = 1024


def OVERFLOW_SLOT(n_bins: int) -> int:  # noqa: N802 - a constant that depends on the bin count
    return n_bins + 1


def NAN_SLOT(n_bins: int) -> int:  # noqa: N802
    return n_bins + 2


def new_counts(features: int, n_bins: int) -> np.ndarray:
    """Zeroed counts for ``features`` features of ``n_bins`` bins (int64, [features, n_bins + 3])."""
    return np.zeros((features, n_bins + 3), dtype=np.int64)


@njit(nogil=True, cache=True)
def _update_uniform(counts, values, edges, norm):  # pragma: no cover - compiled
    rows, features = values.shape
    n = edges.shape[1] - 1
    for r in range(rows):  # row by row: values are read in memory order
        for f in range(features):
            x = values[r, f]
            if x != x:
                counts[f, n + 2] += 1
            elif x < edges[f, 0]:
                counts[f, 0] += 1
            elif x > edges[f, n]:
                counts[f, n + 1] += 1
            else:
                i = _cell((x - edges[f, 0]) * norm[f], n)
                # The multiplication may land off by one next to an edge (or further for degenerate spans):
                # walk to the bin whose edges hold x, as np.histogram corrects its own estimate.
                while i > 0 and x < edges[f, i]:
                    i -= 1
                while i < n - 1 and x >= edges[f, i + 1]:
                    i += 1
                counts[f, i + 1] += 1


@njit(nogil=True, cache=True, inline="always")
def _cell(t, cells):  # pragma: no cover - compiled
    """``int(t)`` clamped to [0, cells - 1]; compared first, so NaN and infinities never reach the conversion."""
    if t >= cells:
        return cells - 1
    if t > 0.0:
        return int(t)
    return 0


@njit(nogil=True, cache=True)
def _update_guided(counts, values, edges, guide, guide_norm):  # pragma: no cover - compiled
    rows, features = values.shape
    n = edges.shape[1] - 1
    cells = guide.shape[1]
    for r in range(rows):
        for f in range(features):
            x = values[r, f]
            if x != x:
                counts[f, n + 2] += 1
            elif x < edges[f, 0]:
                counts[f, 0] += 1
            elif x > edges[f, n]:
                counts[f, n + 1] += 1
            else:
                # The guide names the bin at the left of x's cell; a short walk (usually none) finds x's bin.
                i = guide[f, _cell((x - edges[f, 0]) * guide_norm[f], cells)]
                while i > 0 and x < edges[f, i]:
                    i -= 1
                while i < n - 1 and x >= edges[f, i + 1]:
                    i += 1
                counts[f, i + 1] += 1


@njit(nogil=True, cache=True)
def _update_categorical(counts, codes):  # pragma: no cover - compiled
    rows, features = codes.shape
    other = counts.shape[1] - 1
    for f in range(features):
        row = counts[f]
        for r in range(rows):
            c = codes[r, f]
            if 0 <= c < other:
                row[c] += 1
            else:
                row[other] += 1


def _check(counts: np.ndarray, values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = _rows(values, np.float64)
    edges = np.ascontiguousarray(edges, dtype=np.float64)
    if edges.ndim != 2 or edges.shape[1] < 2:
        raise ValueError(f"edges must be [features, n_bins + 1] with n_bins >= 1, got shape {edges.shape}")
    features, n_edges = edges.shape
    if values.shape[1] != features:
        raise ValueError(f"values have {values.shape[1]} features, edges {features}")
    if counts.dtype != np.int64 or counts.shape != (features, n_edges + 2) or not counts.flags.c_contiguous:
        raise ValueError(f"counts must be C-contiguous int64 of shape {(features, n_edges + 2)}, got {counts.shape}")
    if not np.isfinite(edges).all() or (np.diff(edges, axis=1) <= 0).any():
        raise ValueError("edges must be finite and strictly increasing along each feature")
    with np.errstate(over="ignore"):
        if not np.isfinite(edges[:, -1] - edges[:, 0]).all():
            raise ValueError("edges must span a finite range (edges[n] - edges[0] overflows)")
    return values, edges


def _rows(values: np.ndarray, dtype: type) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"values must be [rows, features], got shape {values.shape}")
    return np.ascontiguousarray(values, dtype=dtype)


def update_uniform(counts: np.ndarray, values: np.ndarray, edges: np.ndarray) -> None:
    """Add ``values`` ([rows, features]) to ``counts`` for equal-width ``edges`` ([features, n_bins + 1]).

    Bins are found by one multiplication, then corrected against the edges, so the result equals
    ``np.histogram`` for in-range values exactly. Widths may differ by rounding (up to 1%); any more is an error.
    """
    values, edges = _check(counts, values, edges)
    widths = np.diff(edges, axis=1)
    if (widths.max(axis=1) > 1.01 * widths.min(axis=1)).any():
        raise ValueError("update_uniform needs equal-width edges (np.linspace); use update_sorted_edges")
    with np.errstate(over="ignore", divide="ignore"):
        norm = (edges.shape[1] - 1) / (edges[:, -1] - edges[:, 0])
    _update_uniform(counts, values, edges, norm)


def edge_guide(edges: np.ndarray, cells: int = GUIDE_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """The lookup table ``update_sorted_edges`` uses: ``cells`` equal cells over [edges[0], edges[n]] per feature,
    each naming the bin its left end falls in; and the cells per unit of x. Compute it once per set of edges."""
    edges = np.asarray(edges, dtype=np.float64)
    n = edges.shape[1] - 1
    span = edges[:, -1] - edges[:, 0]
    with np.errstate(over="ignore", divide="ignore"):
        norm = cells / span
    lefts = edges[:, :1] + span[:, None] * (np.arange(cells)[None, :] / cells)
    guide = np.stack([np.searchsorted(e, left, side="right") - 1 for e, left in zip(edges, lefts, strict=True)])
    return np.ascontiguousarray(np.clip(guide, 0, n - 1), dtype=np.int64), norm


def update_sorted_edges(
    counts: np.ndarray, values: np.ndarray, edges: np.ndarray, guide: tuple[np.ndarray, np.ndarray] | None = None
) -> None:
    """Add ``values`` to ``counts`` for arbitrary increasing ``edges`` ([features, n_bins + 1]).

    A bin is found through a table of equal cells (``edge_guide``; pass it when calling repeatedly with the same
    edges) and a short walk along the edges, so the result equals ``np.histogram`` with these edges exactly. (A
    binary search, even branch-free, measured 3-4x slower here: its steps depend on each other.)
    """
    values, edges = _check(counts, values, edges)
    table, norm = guide if guide is not None else edge_guide(edges)
    if table.shape[0] != edges.shape[0] or norm.shape != (edges.shape[0],):
        raise ValueError("guide was made for other edges")
    _update_guided(counts, values, edges, table, norm)


def update_categorical(counts: np.ndarray, codes: np.ndarray) -> None:
    """Add integer ``codes`` ([rows, features]) to ``counts`` ([features, V + 1]); codes outside [0, V) count in the
    last slot."""
    codes = _rows(codes, np.int64)
    if counts.dtype != np.int64 or counts.ndim != 2 or counts.shape[0] != codes.shape[1] or counts.shape[1] < 1:
        raise ValueError(f"counts must be int64 [features, V + 1] for {codes.shape[1]} features, got {counts.shape}")
    if not counts.flags.c_contiguous:
        raise ValueError("counts must be C-contiguous")
    _update_categorical(counts, codes)

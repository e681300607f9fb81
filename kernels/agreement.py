"""A shadow's answer against production's, element by element: one pass instead of a dozen small numpy calls.

A shadow copy's outputs are small (a few rows), so comparing them with numpy costs mostly the calls themselves
(about 8 µs per output tensor); each kernel here is one call. Definitions (``p`` production, ``s`` shadow, both
float64 for ``differences``):

=================  ==========================================================================================
differences        ``(matched, abs_sum, sq_sum, abs_max, elements)``: ``matched`` when every element has
                   ``|s - p| <= atol + rtol * |p|`` with ``p`` finite, or ``p == s``, or both NaN; the sums, the
                   maximum and the count are over the elements whose difference ``|s - p|`` is finite
                   (0, 0, 0, 0 when none is)
argmax_agreement   the rows (first axis of two [rows, k] arrays) whose index of the largest value is the same in
                   both, each index taken as ``numpy.argmax`` does: the first largest value, or the first NaN
=================  ==========================================================================================
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["argmax_agreement", "differences", "warm_up"]


@njit(nogil=True, cache=True)
def _differences(p, s, atol, rtol):  # pragma: no cover - compiled
    matched = True
    abs_sum = 0.0
    sq_sum = 0.0
    abs_max = 0.0
    elements = 0
    for i in range(p.size):
        pv = p[i]
        sv = s[i]
        d = abs(sv - pv)
        if math.isfinite(d):
            abs_sum += d
            sq_sum += d * d
            if d > abs_max:
                abs_max = d
            elements += 1
        if matched and not (
            (d <= atol + rtol * abs(pv) and math.isfinite(pv)) or pv == sv or (math.isnan(pv) and math.isnan(sv))
        ):
            matched = False
    return matched, abs_sum, sq_sum, abs_max, elements


def differences(
    production: np.ndarray, shadow: np.ndarray, atol: float, rtol: float
) -> tuple[bool, tuple[float, float, float, int]]:
    """(every element matches, (abs_sum, sq_sum, abs_max, elements)) of two arrays of the same size, any numeric
    dtype, compared in float64 (integers never wrap)."""
    p = np.ascontiguousarray(production, dtype=np.float64).reshape(-1)
    s = np.ascontiguousarray(shadow, dtype=np.float64).reshape(-1)
    if p.size != s.size:
        raise ValueError(f"{p.size} production elements against {s.size} shadow elements")
    matched, abs_sum, sq_sum, abs_max, elements = _differences(p, s, float(atol), float(rtol))
    return bool(matched), (float(abs_sum), float(sq_sum), float(abs_max), int(elements))


@njit(nogil=True, cache=True, inline="always")
def _row_argmax(values, row):  # pragma: no cover - compiled
    best = 0
    top = values[row, 0]
    if top != top:  # NaN: numpy's argmax takes the first one
        return 0
    for j in range(1, values.shape[1]):
        v = values[row, j]
        if v != v:
            return j
        if v > top:
            best = j
            top = v
    return best


@njit(nogil=True, cache=True)
def _argmax_agreement(p, s):  # pragma: no cover - compiled
    agree = 0
    for row in range(p.shape[0]):
        if _row_argmax(p, row) == _row_argmax(s, row):
            agree += 1
    return agree


def argmax_agreement(production: np.ndarray, shadow: np.ndarray) -> int:
    """How many rows of two [rows, k] arrays (k >= 1, same shape, numeric) have the same argmax."""
    if production.shape != shadow.shape or production.ndim != 2 or production.shape[1] == 0:
        raise ValueError(f"argmax over rows needs two [rows, k>=1] arrays: {production.shape}, {shadow.shape}")
    return int(_argmax_agreement(_orderable(production, shadow.dtype), _orderable(shadow, production.dtype)))


def _orderable(values: np.ndarray, other: np.dtype) -> np.ndarray:
    """``values`` in a dtype the kernel compiles for and shares with the other array: float64 when the two differ,
    float32 for float16 (exact), uint8 for booleans."""
    if values.dtype != other:
        return values.astype(np.float64)
    if values.dtype == np.float16:
        return values.astype(np.float32)
    if values.dtype == np.bool_:
        return values.view(np.uint8)
    return values


def warm_up() -> None:
    """Compile (or load from the cache) both kernels for the dtypes answers mostly carry; a no-op once done."""
    values = np.full((2, 2), 0.5)
    differences(values, values, 0.0, 0.0)
    for dtype in (np.float32, np.float64, np.int64):
        argmax_agreement(values.astype(dtype), values.astype(dtype))

"""Divergences between a reference and a current distribution, from binned counts, batched over features.

Every function takes ``reference`` and ``current`` counts of the same shape [features, K] (a 1-D array is one
feature) — non-negative, finite; pass the histogram slots that form the distribution (underflow, bins, overflow;
NaN counted apart) — and returns one float64 per feature. With ``N = sum(reference[f])``, ``M = sum(current[f])``,
proportions are ``p_k = reference[f, k] / N`` and ``q_k = current[f, k] / M``. A feature with ``N = 0`` or ``M = 0``
gives NaN.

===============  =========================================================================================
psi              ``sum_k (q'_k - p'_k) * ln(q'_k / p'_k)``, natural log, with ``p' = max(p, eps)``,
                 ``q' = max(q, eps)``, ``eps = 1e-4`` by default (empty bins clipped, as Evidently does)
kl               ``sum_k q'_k * ln(q'_k / p'_k)``: KL(current || reference), natural log, same clipping
js               Jensen-Shannon *distance*, log base 2, no epsilon: ``sqrt(JSD)``,
                 ``JSD = 1/2 sum_k p_k log2(p_k / m_k) + 1/2 sum_k q_k log2(q_k / m_k)``, ``m = (p + q) / 2``,
                 terms with a zero numerator are 0 (as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``);
                 in [0, 1]
hellinger        ``sqrt(1/2 sum_k (sqrt(p_k) - sqrt(q_k))^2)``, in [0, 1]
linf             ``max_k |p_k - q_k|``
wasserstein      W1 with slot k's mass at ``positions[f, k]`` (increasing): ``sum_{k<K-1} |P_k - Q_k| *
                 (positions[k+1] - positions[k])``, ``P``, ``Q`` cumulative proportions (as
                 ``scipy.stats.wasserstein_distance`` over those positions with those weights)
ks               ``D = max_k |P_k - Q_k|`` over cumulative proportions (never more than the KS statistic of the raw
                 samples), and the asymptotic p-value ``Q_KS(lambda) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lambda^2)``
                 with ``lambda = (sqrt(n) + 0.12 + 0.11 / sqrt(n)) * D``, ``n = N M / (N + M)`` (Stephens)
chi_square       Pearson's statistic of the 2 x K table of counts, over the columns with a non-zero total:
                 ``sum (O - E)^2 / E``, ``E = row total * column total / (N + M)``; ``df = columns - 1``; p-value
                 the regularized upper incomplete gamma ``Q(df / 2, statistic / 2)``, 1 when df = 0 (as
                 ``scipy.stats.chi2_contingency(..., correction=False)``). With ``min_expected`` > 0, sparse
                 columns are pooled first (Cochran's rule): a column's size is ``e_k = min(N, M) *
                 max(reference[f, k] / N, total_k / (N + M))`` (the reference's share, so that the pooling does
                 not pick the bins where the current sample happens to be low; the column's share when larger, so
                 that a category the reference never saw, in bulk, stands alone); in increasing order of ``e_k``
                 (ties by slot), a column joins one pooled column while the pool's size or its own is below
                 ``min_expected``; the statistic is then that of the coarser table
===============  =========================================================================================
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "DEFAULT_EPSILON",
    "chi_square",
    "hellinger",
    "js",
    "kl",
    "ks",
    "linf",
    "psi",
    "slot_positions",
    "wasserstein",
]

DEFAULT_EPSILON = 1e-4


@njit(nogil=True, cache=True)
def _totals(reference, current, f):  # pragma: no cover - compiled
    n = 0.0
    m = 0.0
    for k in range(reference.shape[1]):
        n += reference[f, k]
        m += current[f, k]
    return n, m


@njit(nogil=True, cache=True)
def _psi_kl(reference, current, eps, symmetric):  # pragma: no cover - compiled
    features, slots = reference.shape
    out = np.empty(features)
    for f in range(features):
        n, m = _totals(reference, current, f)
        if n == 0.0 or m == 0.0:
            out[f] = np.nan
            continue
        total = 0.0
        for k in range(slots):
            p = max(reference[f, k] / n, eps)
            q = max(current[f, k] / m, eps)
            total += (q - p) * math.log(q / p) if symmetric else q * math.log(q / p)
        out[f] = total
    return out


@njit(nogil=True, cache=True)
def _shape_distances(reference, current):  # pragma: no cover - compiled
    """(JS distance base 2, Hellinger, L-infinity) per feature."""
    features, slots = reference.shape
    out = np.empty((3, features))
    for f in range(features):
        n, m = _totals(reference, current, f)
        if n == 0.0 or m == 0.0:
            out[:, f] = np.nan
            continue
        js = 0.0
        hellinger = 0.0
        linf = 0.0
        for k in range(slots):
            p = reference[f, k] / n
            q = current[f, k] / m
            mid = 0.5 * (p + q)
            if p > 0.0:
                js += p * math.log2(p / mid)
            if q > 0.0:
                js += q * math.log2(q / mid)
            d = math.sqrt(p) - math.sqrt(q)
            hellinger += d * d
            linf = max(linf, abs(p - q))
        out[0, f] = math.sqrt(max(0.5 * js, 0.0))
        out[1, f] = math.sqrt(0.5 * hellinger)
        out[2, f] = linf
    return out


@njit(nogil=True, cache=True)
def _cdf_distances(reference, current, positions):  # pragma: no cover - compiled
    """(W1, KS statistic, KS p-value) per feature."""
    features, slots = reference.shape
    out = np.empty((3, features))
    for f in range(features):
        n, m = _totals(reference, current, f)
        if n == 0.0 or m == 0.0:
            out[:, f] = np.nan
            continue
        big_p = 0.0
        big_q = 0.0
        w1 = 0.0
        d = 0.0
        for k in range(slots):
            big_p += reference[f, k] / n
            big_q += current[f, k] / m
            gap = abs(big_p - big_q)
            d = max(d, gap)
            if k < slots - 1:
                w1 += gap * (positions[f, k + 1] - positions[f, k])
        out[0, f] = w1
        out[1, f] = d
        out[2, f] = _kolmogorov_q(d, n * m / (n + m))
    return out


@njit(nogil=True, cache=True)
def _kolmogorov_q(d, n):  # pragma: no cover - compiled
    if d == 0.0 or n <= 0.0:
        return 1.0
    root = math.sqrt(n)
    lam = (root + 0.12 + 0.11 / root) * d
    if lam < 0.2:
        return 1.0
    total = 0.0
    sign = 1.0
    for j in range(1, 101):
        term = sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-16 * abs(total) or abs(term) < 1e-300:
            break
        sign = -sign
    return min(max(2.0 * total, 0.0), 1.0)


@njit(nogil=True, cache=True)
def _chi_square(reference, current, min_expected):  # pragma: no cover - compiled
    """(statistic, degrees of freedom, p-value) per feature, sparse columns pooled below ``min_expected``."""
    features, slots = reference.shape
    out = np.empty((3, features))
    totals = np.empty(slots)
    for f in range(features):
        n, m = _totals(reference, current, f)
        if n == 0.0 or m == 0.0:
            out[:, f] = np.nan
            continue
        total = n + m
        small = min(n, m)
        for k in range(slots):
            totals[k] = small * max(reference[f, k] / n, (reference[f, k] + current[f, k]) / total)
        order = np.argsort(totals, kind="mergesort")
        stat = 0.0
        columns = 0
        pool_r = 0.0
        pool_c = 0.0
        for i in range(slots):
            k = order[i]
            if reference[f, k] + current[f, k] == 0.0:
                continue
            pool = small * max(pool_r / n, (pool_r + pool_c) / total)
            if (pool_r + pool_c > 0.0 and pool < min_expected) or totals[k] < min_expected:
                pool_r += reference[f, k]
                pool_c += current[f, k]
                continue
            columns += 1
            stat += _cell_terms(reference[f, k], current[f, k], n, m, total)
        if pool_r + pool_c > 0.0:
            columns += 1
            stat += _cell_terms(pool_r, pool_c, n, m, total)
        df = columns - 1
        out[0, f] = stat
        out[1, f] = df
        out[2, f] = _gamma_q(0.5 * df, 0.5 * stat) if df > 0 else 1.0
    return out


@njit(nogil=True, cache=True)
def _cell_terms(observed_r, observed_c, n, m, total):  # pragma: no cover - compiled
    """The two cells of one column of the 2 x K table: ``(O - E)^2 / E`` each."""
    column = observed_r + observed_c
    expected_r = n * column / total
    expected_c = m * column / total
    stat = 0.0
    if expected_r > 0.0:  # an expected count can underflow to 0 only for tiny fractional counts
        stat += (observed_r - expected_r) ** 2 / expected_r
    if expected_c > 0.0:
        stat += (observed_c - expected_c) ** 2 / expected_c
    return stat


@njit(nogil=True, cache=True)
def _gamma_q(a, x):  # pragma: no cover - compiled
    """Regularized upper incomplete gamma Q(a, x): a series below a + 1, a continued fraction above."""
    if x <= 0.0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = 1.0 / a
        total = term
        ap = a
        for _ in range(10000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return min(1.0, math.exp(log_prefix) * h)


# --- validating wrappers ------------------------------------------------------------------------------------------


def _pair(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.ndim == 1 and current.ndim == 1:
        reference, current = reference[None, :], current[None, :]
    if reference.ndim != 2 or reference.shape != current.shape or reference.shape[1] < 1:
        raise ValueError(f"reference and current counts must both be [features, K]: {reference.shape}, {current.shape}")
    for name, counts in (("reference", reference), ("current", current)):
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"{name} counts must be finite and non-negative")
    return np.ascontiguousarray(reference), np.ascontiguousarray(current)


def psi(reference: np.ndarray, current: np.ndarray, eps: float = DEFAULT_EPSILON) -> np.ndarray:
    """Population stability index per feature (see the module table)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return _psi_kl(*_pair(reference, current), eps, True)


def kl(reference: np.ndarray, current: np.ndarray, eps: float = DEFAULT_EPSILON) -> np.ndarray:
    """KL(current || reference) per feature, natural log (see the module table)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return _psi_kl(*_pair(reference, current), eps, False)


def js(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance, base 2, per feature."""
    return _shape_distances(*_pair(reference, current))[0]


def hellinger(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Hellinger distance per feature."""
    return _shape_distances(*_pair(reference, current))[1]


def linf(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Largest difference of proportions per feature."""
    return _shape_distances(*_pair(reference, current))[2]


def wasserstein(reference: np.ndarray, current: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """W1 per feature, each slot's mass at ``positions`` ([features, K], increasing; see ``slot_positions``)."""
    reference, current = _pair(reference, current)
    positions = np.ascontiguousarray(np.broadcast_to(np.asarray(positions, dtype=np.float64), reference.shape))
    if not np.isfinite(positions).all() or (np.diff(positions, axis=1) < 0).any():
        raise ValueError("positions must be finite and non-decreasing along each feature")
    return _cdf_distances(reference, current, positions)[0]


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KS statistic on bins, approximate p-value) per feature."""
    reference, current = _pair(reference, current)
    out = _cdf_distances(reference, current, np.zeros_like(reference))
    return out[1], out[2]


def chi_square(
    reference: np.ndarray, current: np.ndarray, min_expected: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(statistic, degrees of freedom, p-value) per feature; ``min_expected`` (counts, >= 0): columns whose smaller
    expected count is below it are pooled first (0: every non-empty column stands alone, as scipy)."""
    if not (math.isfinite(min_expected) and min_expected >= 0.0):
        raise ValueError(f"min_expected must be a finite count >= 0, got {min_expected}")
    out = _chi_square(*_pair(reference, current), float(min_expected))
    return out[0], out[1], out[2]


def slot_positions(edges: np.ndarray) -> np.ndarray:
    """Where W1 puts each slot's mass for histogram ``edges`` ([features, n + 1]): underflow at the lowest edge,
    each bin at its centre, overflow at the highest edge ([features, n + 2])."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim == 1:
        edges = edges[None, :]
    centres = 0.5 * (edges[:, 1:] + edges[:, :-1])
    return np.concatenate([edges[:, :1], centres, edges[:, -1:]], axis=1)

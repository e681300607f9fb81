"""The drift methods by name: which kernel scores each, whether its score is a p-value or a distance, which series it
applies to, and its default threshold. One table, read by config validation, the drift engine and the docs.

Every entry's ``score(reference, current, positions)`` takes [series, K] counts (see divergence.py) and gives one
float64 per series; ``positions`` (slot positions, needed by ``w1`` only) may be None for categorical series. A
series *drifted* by a method when its score is below the threshold for a p-value, above it for a distance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from mlmirror.kernels.divergence import chi_square, hellinger, js, kl, ks, linf, psi, wasserstein

__all__ = [
    "CHI2_MIN_EXPECTED",
    "DEFAULT_CATEGORICAL",
    "DEFAULT_NUMERIC",
    "DRIFT_METHODS",
    "DriftMethod",
    "methods_table",
]

#: Cochran's rule: chi-square pools the columns whose smaller expected count is below this (counts), so that the
#: asymptotic p-value holds at small windows and for rare categories (see divergence.chi_square).
CHI2_MIN_EXPECTED = 5.0

Score = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True, slots=True)
class DriftMethod:
    """One drift method.

    ``numeric`` / ``categorical``: the kinds of series it is scored on. ``detects``: the kinds of series on which it
    may decide "drifted"; on the other kind, that kind's default method (``DEFAULT_NUMERIC``,
    ``DEFAULT_CATEGORICAL``) stands in. ``needs_positions``: scored only when slot positions are given.
    """

    name: str
    score: Score
    p_value: bool
    default_threshold: float
    numeric: bool
    categorical: bool
    detects: frozenset[str]
    summary: str
    needs_positions: bool = False

    def drifted(self, score: float, threshold: float) -> bool:
        """Whether ``score`` crosses ``threshold`` (below it for a p-value, above it for a distance); NaN never does."""
        return bool(score < threshold) if self.p_value else bool(score > threshold)

    def applies_to(self, *, categorical: bool) -> bool:
        """Whether the method is scored on a series of this kind."""
        return self.categorical if categorical else self.numeric


_BOTH = frozenset({"numeric", "categorical"})


def _w1(reference: np.ndarray, current: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    assert positions is not None  # needs_positions: scored only with them
    return wasserstein(reference, current, positions)


DRIFT_METHODS: Mapping[str, DriftMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            DriftMethod(
                "ks", lambda r, c, _: ks(r, c)[1], True, 0.01, True, False, frozenset({"numeric"}),
                "Kolmogorov-Smirnov p-value over the bins",
            ),
            DriftMethod(
                "chi2", lambda r, c, _: chi_square(r, c, CHI2_MIN_EXPECTED)[2], True, 0.01, True, True,
                frozenset({"categorical"}), "Pearson's chi-square p-value (sparse cells pooled)",
            ),
            DriftMethod("psi", lambda r, c, _: psi(r, c), False, 0.2, True, True, _BOTH, "population stability index"),
            DriftMethod("js", lambda r, c, _: js(r, c), False, 0.1, True, True, _BOTH, "Jensen-Shannon distance"),
            DriftMethod(
                "hellinger", lambda r, c, _: hellinger(r, c), False, 0.1, True, True, _BOTH, "Hellinger distance"
            ),
            DriftMethod("linf", lambda r, c, _: linf(r, c), False, 0.1, True, True, _BOTH, "largest bin difference"),
            DriftMethod(
                "kl", lambda r, c, _: kl(r, c), False, 0.1, True, True, _BOTH, "KL divergence of current from reference"
            ),
            DriftMethod(
                "w1", _w1, False, 0.1, True, False, frozenset({"numeric"}),
                "Wasserstein-1, in the feature's units (set its threshold)", needs_positions=True,
            ),
        )
    }
)  # fmt: skip

#: Always scored on numeric series, and the stand-in judge there for a method that detects only categorical drift.
DEFAULT_NUMERIC = "ks"
#: Always scored on categorical series, and the stand-in judge there for a method that detects only numeric drift.
DEFAULT_CATEGORICAL = "chi2"


def methods_table() -> str:
    """The methods as a Markdown table (docs/DRIFT.md holds it verbatim; a test keeps the two the same)."""
    rows = [
        "| method | score | scored on | decides on | drifted when | default threshold |",
        "|---|---|---|---|---|---|",
    ]
    for m in DRIFT_METHODS.values():
        kinds = " and ".join(k for k, on in (("numeric", m.numeric), ("categorical", m.categorical)) if on)
        decides = " and ".join(k for k in ("numeric", "categorical") if k in m.detects)
        when = "p-value < threshold" if m.p_value else "score > threshold"
        rows.append(f"| `{m.name}` | {m.summary} | {kinds} | {decides} | {when} | {m.default_threshold:g} |")
    return "\n".join(rows)

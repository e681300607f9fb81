"""A shadow's rolling window of mirrored calls, and the promotion verdict drawn from it.

Each mirrored call that finished adds one ``Outcome``; the window keeps the last ``promotion.window`` of them. The
verdict (see ``Promotion`` in config) uses:

- agreement ratio ``a = agree / samples`` and its Wilson score lower bound at confidence ``c`` (two-sided,
  ``z = Phi^-1(1 - (1 - c) / 2)``)::

      lower = (a + z^2/(2n) - z * sqrt(a(1 - a)/n + z^2/(4n^2))) / (1 + z^2/n),   n = samples

- noise: ``1 - a_control`` of the route's control shadow when it has ``min_samples`` samples, else 0;
- error ratios: failed shadow calls / calls, and calls production did not answer itself / calls;
- p99 latencies: of the shadow's calls (all outcomes), and of production's upstream call where it answered.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from mlmirror.config import Promotion

__all__ = ["Outcome", "Verdict", "Window", "WindowSummary", "judge", "wilson_lower_bound"]


def wilson_lower_bound(successes: int, trials: int, confidence: float) -> float:
    """Lower end of the Wilson score interval for a binomial proportion; 0 when there are no trials or successes."""
    if trials <= 0 or successes <= 0:
        return 0.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / trials
    z2n = z * z / trials
    centre = p + z2n / 2
    margin = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    return max(0.0, (centre - margin) / (1 + z2n))


class Outcome(NamedTuple):
    """One mirrored call. Latencies in seconds (production's is NaN when production did not answer it)."""

    shadow_ok: bool
    production_ok: bool
    agree: int
    samples: int
    shadow_latency: float
    production_latency: float
    abs_sum: float
    sq_sum: float
    abs_max: float
    elements: int
    compared: bool  # both answered and the answers were compared (possibly with a comparison error)


@dataclass(frozen=True, slots=True)
class WindowSummary:
    """Totals over a window. Ratios are NaN when their denominator is 0."""

    calls: int
    compared: int
    agree: int
    samples: int
    shadow_errors: int
    production_errors: int
    shadow_p99: float
    production_p99: float
    mae: float
    rmse: float
    abs_max: float

    @property
    def agreement(self) -> float:
        return self.agree / self.samples if self.samples else math.nan

    @property
    def shadow_error_ratio(self) -> float:
        return self.shadow_errors / self.calls if self.calls else math.nan

    @property
    def production_error_ratio(self) -> float:
        return self.production_errors / self.calls if self.calls else math.nan


class Window:
    """The last ``size`` outcomes of one shadow."""

    __slots__ = ("_outcomes",)

    def __init__(self, size: int) -> None:
        self._outcomes: deque[Outcome] = deque(maxlen=size)

    def add(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)

    def __len__(self) -> int:
        return len(self._outcomes)

    def summary(self) -> WindowSummary:
        outcomes = list(self._outcomes)
        if not outcomes:
            nan = math.nan
            return WindowSummary(0, 0, 0, 0, 0, 0, nan, nan, nan, nan, nan)
        columns = list(zip(*outcomes, strict=True))
        shadow_latency = np.array(columns[4])
        production_latency = np.array(columns[5])
        production_latency = production_latency[~np.isnan(production_latency)]
        elements = sum(columns[9])
        return WindowSummary(
            calls=len(outcomes),
            compared=sum(columns[10]),
            agree=sum(columns[2]),
            samples=sum(columns[3]),
            shadow_errors=len(outcomes) - sum(columns[0]),
            production_errors=len(outcomes) - sum(columns[1]),
            shadow_p99=float(np.quantile(shadow_latency, 0.99)),
            production_p99=float(np.quantile(production_latency, 0.99)) if production_latency.size else math.nan,
            mae=sum(columns[6]) / elements if elements else math.nan,
            rmse=math.sqrt(sum(columns[7]) / elements) if elements else math.nan,
            abs_max=max(columns[8]) if elements else math.nan,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a shadow may replace the primary, why not when it may not, and the figures behind it."""

    promotable: bool
    reasons: tuple[str, ...]
    lower_bound: float
    noise: float


def judge(summary: WindowSummary, spec: Promotion, noise: float, *, control: bool = False) -> Verdict:
    """The promotion verdict for a shadow's window summary (``noise``: the control's disagreement, or 0)."""
    lower = wilson_lower_bound(summary.agree, summary.samples, spec.confidence)
    reasons = []
    if control:
        reasons.append("control shadow: it measures noise and is never promoted")
    if summary.samples < spec.min_samples:
        reasons.append(f"needs {spec.min_samples} agreement samples, has {summary.samples}")
    elif lower + noise < spec.agreement:
        noise_text = f" + noise {noise:.4f}" if noise else ""
        reasons.append(f"agreement lower bound {lower:.4f}{noise_text} < {spec.agreement:g}")
    if summary.calls:
        shadow_errors, production_errors = summary.shadow_error_ratio, summary.production_error_ratio
        if shadow_errors > production_errors + spec.error_margin:
            reasons.append(
                f"error ratio {shadow_errors:.2%} > production {production_errors:.2%} + {spec.error_margin:.2%}"
            )
        if not summary.shadow_p99 <= summary.production_p99 * spec.latency_factor:
            reasons.append(
                f"p99 {summary.shadow_p99 * 1e3:.1f} ms > {spec.latency_factor:g} x production "
                f"{summary.production_p99 * 1e3:.1f} ms"
            )
    return Verdict(promotable=not reasons, reasons=tuple(reasons), lower_bound=lower, noise=noise)

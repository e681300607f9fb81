"""What one shadow did, counted per call: copies by final code and latency, drops by reason, comparisons, the
requests that merged several copies, and the rolling verdict window."""

from __future__ import annotations

from bisect import bisect_left

from mlmirror.metrics import LATENCY_BUCKETS
from mlmirror.observing.shadows.compare import Comparison
from mlmirror.observing.shadows.verdict import Window

__all__ = ["DROP_REASONS", "ShadowStats"]

#: Why a sampled copy was not sent (proxy/observing/shadows/mirror.py says when each applies).
DROP_REASONS = ("too_large", "shed", "circuit_open", "queue_full", "closed", "unredactable")


class ShadowStats:
    """What one shadow did: cumulative counters (exported as Prometheus counters) and the rolling window."""

    __slots__ = ("comparison_errors", "comparisons", "drops", "latency", "merged", "results", "window")

    def __init__(self, window: int) -> None:
        #: grpc code name -> copies that ended with it
        self.results: dict[str, int] = {}
        #: reason -> copies not sent
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        #: match | mismatch | error -> compared answers
        self.comparisons: dict[str, int] = {"match": 0, "mismatch": 0, "error": 0}
        #: reason -> comparison errors
        self.comparison_errors: dict[str, int] = {}
        #: copies per latency bucket (the last one +Inf), then the sum of seconds
        self.latency: list[float] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        #: [requests that carried several copies, the copies they carried] (``batch``)
        self.merged = [0, 0]
        self.window = Window(window)

    def dropped(self, reason: str) -> None:
        self.drops[reason] += 1

    def finished(self, code: str, seconds: float) -> None:
        self.results[code] = self.results.get(code, 0) + 1
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency[-1] += seconds

    def compared(self, comparison: Comparison) -> None:
        if comparison.error is not None:
            self.comparisons["error"] += 1
            self.comparison_errors[comparison.error] = self.comparison_errors.get(comparison.error, 0) + 1
        else:
            self.comparisons["match" if comparison.matched else "mismatch"] += 1

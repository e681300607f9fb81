"""What the shadows show to the outside: Prometheus families (built at scrape time) and ``/status`` entries."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from mlmirror.metrics import LATENCY_BUCKETS
from mlmirror.observing.figures import json_number
from mlmirror.observing.shadows.mirror import RouteMirror, ShadowMirror
from mlmirror.observing.shadows.verdict import Verdict, WindowSummary
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["ShadowCollector", "shadow_status"]


class ShadowCollector(Collector):
    """Exports every shadow of the current route table. ``mirrors()`` gives the route mirrors to report."""

    def __init__(self, mirrors: Callable[[], Iterable[RouteMirror]]) -> None:
        self._mirrors = mirrors

    def collect(self) -> Iterator[Metric]:
        labels = ["route", "shadow"]
        f = _Families(labels)
        for route in self._mirrors():
            for shadow, (summary, verdict) in zip(route.shadows, route.verdicts().values(), strict=True):
                key = [route.route, shadow.name]
                stats = shadow.stats
                for code, n in stats.results.items():
                    f.requests.add_metric([*key, code], n)
                for reason, n in stats.drops.items():
                    f.dropped.add_metric([*key, reason], n)
                for result, n in stats.comparisons.items():
                    f.comparisons.add_metric([*key, result], n)
                for reason, n in stats.comparison_errors.items():
                    f.comparison_errors.add_metric([*key, reason], n)
                bounds = [floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf)]
                cumulative = list(accumulate(stats.latency[:-1]))
                f.latency.add_metric(key, list(zip(bounds, cumulative, strict=True)), stats.latency[-1])
                f.merged.add_metric([*key, "requests"], stats.merged[0])
                f.merged.add_metric([*key, "copies"], stats.merged[1])
                for result, n in shadow.merge_check.counts.items():
                    f.merge_checks.add_metric([*key, result], n)
                f.inflight.add_metric(key, shadow.inflight)
                f.queued.add_metric(key, shadow.queued)
                f.window(key, summary, verdict)
        yield from f.all()


class _Families:
    def __init__(self, labels: list[str]) -> None:
        self.requests = CounterMetricFamily(
            "mlmirror_mirror_requests", "Copies sent to shadows, by final gRPC status.", labels=[*labels, "result"]
        )
        self.dropped = CounterMetricFamily(
            "mlmirror_mirror_dropped", "Sampled copies not sent to a shadow, by reason.", labels=[*labels, "reason"]
        )
        self.comparisons = CounterMetricFamily(
            "mlmirror_shadow_comparisons",
            "Shadow answers compared with production's: match, mismatch (beyond atol/rtol) or error.",
            labels=[*labels, "result"],
        )
        self.comparison_errors = CounterMetricFamily(
            "mlmirror_shadow_comparison_errors",
            "Shadow answers that could not be compared with production's, by reason.",
            labels=[*labels, "reason"],
        )
        self.latency = HistogramMetricFamily(
            "mlmirror_shadow_latency_seconds", "Time from sending a copy to a shadow to its answer.", labels=labels
        )
        self.merged = CounterMetricFamily(
            "mlmirror_mirror_merged",
            "Requests that carried several merged copies (`batch`): `requests` sent, `copies` they carried.",
            labels=[*labels, "count"],
        )
        self.merge_checks = CounterMetricFamily(
            "mlmirror_mirror_merge_checks",
            "Merged calls also sent alone to check that merging leaves the answer as it is (`batch_check`): same, "
            "differ or refused (merging stopped), failed (the copy alone failed).",
            labels=[*labels, "result"],
        )
        self.inflight = GaugeMetricFamily("mlmirror_mirror_inflight", "Copies in flight to the shadow.", labels=labels)
        self.queued = GaugeMetricFamily("mlmirror_mirror_queued", "Copies waiting for a slot.", labels=labels)
        window = "over the shadow's window of its last mirrored calls"
        self.agreement = GaugeMetricFamily(
            "mlmirror_shadow_agreement_ratio", f"Agreeing samples / samples, {window}.", labels=labels
        )
        self.lower = GaugeMetricFamily(
            "mlmirror_shadow_agreement_lower_bound", f"Wilson lower bound of agreement, {window}.", labels=labels
        )
        self.samples = GaugeMetricFamily(
            "mlmirror_shadow_agreement_samples", f"Agreement samples behind the ratio, {window}.", labels=labels
        )
        self.calls = GaugeMetricFamily(
            "mlmirror_shadow_window_calls", "Mirrored calls in the shadow's window (behind the error ratios).",
            labels=labels,
        )  # fmt: skip
        self.errors = GaugeMetricFamily(
            "mlmirror_shadow_error_ratio", f"Copies the shadow failed / copies, {window}.", labels=labels
        )
        self.production_errors = GaugeMetricFamily(
            "mlmirror_shadow_production_error_ratio",
            f"Calls production did not answer itself / calls, {window}.",
            labels=labels,
        )
        self.p99 = GaugeMetricFamily(
            "mlmirror_shadow_latency_p99_seconds",
            f"p99 latency of the shadow and of production on the same calls, {window}.",
            labels=[*labels, "side"],
        )
        self.abs_error = GaugeMetricFamily(
            "mlmirror_shadow_abs_error",
            f"|shadow - production| over numeric outputs: mean, max and rms, {window}.",
            labels=[*labels, "stat"],
        )
        self.promotable = GaugeMetricFamily(
            "mlmirror_shadow_promotable", "1 when the shadow meets every promotion criterion, else 0.", labels=labels
        )

    def window(self, key: list[str], summary: WindowSummary, verdict: Verdict) -> None:
        self.agreement.add_metric(key, summary.agreement)
        self.lower.add_metric(key, verdict.lower_bound)
        self.samples.add_metric(key, summary.samples)
        self.calls.add_metric(key, summary.calls)
        self.errors.add_metric(key, summary.shadow_error_ratio)
        self.production_errors.add_metric(key, summary.production_error_ratio)
        self.p99.add_metric([*key, "shadow"], summary.shadow_p99)
        self.p99.add_metric([*key, "production"], summary.production_p99)
        for stat, value in (("mean", summary.mae), ("max", summary.abs_max), ("rms", summary.rmse)):
            self.abs_error.add_metric([*key, stat], value)
        self.promotable.add_metric(key, 1 if verdict.promotable else 0)

    def all(self) -> Iterator[Metric]:
        yield from vars(self).values()


def shadow_status(route: RouteMirror) -> list[dict[str, object]]:
    """The ``/status`` entries of a route's shadows."""
    return [
        _shadow_entry(shadow, summary, verdict)
        for shadow, (summary, verdict) in zip(route.shadows, route.verdicts().values(), strict=True)
    ]


def _shadow_entry(shadow: ShadowMirror, summary: WindowSummary, verdict: Verdict) -> dict[str, object]:
    stats = shadow.stats
    return {
        "name": shadow.name,
        "upstream": shadow.spec.upstream,
        "percent": shadow.spec.percent,
        "control": shadow.spec.control,
        "promotable": verdict.promotable,
        "reasons": list(verdict.reasons),
        "window": {
            "calls": summary.calls,
            "samples": summary.samples,
            "agreement": json_number(summary.agreement),
            "lower_bound": json_number(verdict.lower_bound),
            "noise": json_number(verdict.noise),
            "shadow_error_ratio": json_number(summary.shadow_error_ratio),
            "production_error_ratio": json_number(summary.production_error_ratio),
            "shadow_p99_seconds": json_number(summary.shadow_p99),
            "production_p99_seconds": json_number(summary.production_p99),
            "mae": json_number(summary.mae),
            "rmse": json_number(summary.rmse),
            "max_abs_error": json_number(summary.abs_max),
        },
        "mirrored": dict(sorted(stats.results.items())),
        "dropped": {reason: n for reason, n in stats.drops.items() if n},
        "comparisons": dict(stats.comparisons),
        "comparison_errors": dict(sorted(stats.comparison_errors.items())),
        "transport": shadow.transport,
        "batch": shadow.spec.batch,
        "merged": {"requests": stats.merged[0], "copies": stats.merged[1]},
        "merge_check": {
            "every": shadow.spec.batch_check,
            **shadow.merge_check.counts,
            "stopped": shadow.merge_check.off,
        },
        "inflight": shadow.inflight,
        "queued": shadow.queued,
        "circuit_open": shadow.circuit_open,
    }

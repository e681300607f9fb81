"""One ``/metrics`` for a group of processes (``serve --workers N``): the workers' expositions merged with the hub's.

Counters, histograms and summaries are summed over processes, sample by sample (same name and labels), so rates
and quantiles come out as if one process had served every call. Gauges that count things in progress
(``SUMMED_GAUGES``) are summed too; every other gauge describes one process (its circuit states, event-loop lag,
readiness), so it keeps one series per process under a ``worker`` label (``hub`` for the hub). Families only the
hub has (drift, shadows) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["SHARED_COUNTERS", "SUMMED_GAUGES", "merge_expositions"]

#: Counters of events every process of the group sees at once (a reload reaches each of them): the group's value is
#: the largest, not the sum.
SHARED_COUNTERS = frozenset({"mlmirror_config_reloads"})

#: Gauges whose sum over processes is the group's value.
SUMMED_GAUGES = frozenset(
    {"mlmirror_inflight_calls", "mlmirror_mirror_inflight", "mlmirror_mirror_queued", "mlmirror_extproc_active_streams",
     "mlmirror_envoy_tap_attached"}
)  # fmt: skip


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(hub: str, workers: Mapping[str, str]) -> bytes:
    """The merged exposition (Prometheus text format) of the hub's and each worker's (by worker name)."""
    parsed = [(name, list(text_string_to_metric_families(text))) for name, text in (*workers.items(), ("hub", hub))]
    sources: dict[str, int] = {}
    for _, families in parsed:
        for family in families:
            sources[family.name] = sources.get(family.name, 0) + 1
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple], float]] = {}
    for worker, families in parsed:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                sums[family.name] = {}
            if family.type == "gauge" and family.name not in SUMMED_GAUGES:
                per_process = sources[family.name] > 1  # one process's own gauge keeps its series as they are
                for sample in family.samples:
                    labels = {**sample.labels, "worker": worker} if per_process else sample.labels
                    into.samples.append(Sample(sample.name, labels, sample.value))
                continue
            totals = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type == "info" or family.name in SHARED_COUNTERS:  # the same in every process
                    totals[key] = max(totals.get(key, 0.0), sample.value)
                else:
                    totals[key] = totals.get(key, 0.0) + sample.value
    for name, totals in sums.items():
        for (sample_name, label_pairs), value in totals.items():
            merged[name].samples.append(Sample(sample_name, dict(label_pairs), value))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)

"""Reading a running proxy's admin ``/metrics``: its samples, and the call, mirror and drift totals in them."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = [
    "DRIFT_TOTALS",
    "MirrorCounts",
    "by_label",
    "drift_counts",
    "metric_samples",
    "mirror_counts",
    "total",
    "wait_attached",
]

#: the drift engine's counters, summed over routes by ``drift_counts``
DRIFT_TOTALS = (
    "mlmirror_drift_calls_total",
    "mlmirror_drift_dropped_total",
    "mlmirror_drift_decode_errors_total",
    "mlmirror_drift_windows_total",
)


def metric_samples(admin: int, timeout: float = 10.0) -> list[Sample]:
    """Every sample on ``http://127.0.0.1:admin/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str) -> float:
    """The sum of the samples called ``name`` (0 when there is none)."""
    return sum(sample.value for sample in samples if sample.name == name)


def by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """The samples called ``name``, summed by the value of ``label``."""
    sums: dict[str, float] = {}
    for sample in samples:
        if sample.name == name:
            key = sample.labels[label]
            sums[key] = sums.get(key, 0.0) + sample.value
    return sums


@dataclass
class MirrorCounts:
    """One shadow's counters."""

    results: dict[str, float] = field(default_factory=dict)  # mlmirror_mirror_requests_total by result
    drops: dict[str, float] = field(default_factory=dict)  # mlmirror_mirror_dropped_total by reason
    pending: float = 0.0  # mlmirror_mirror_inflight + mlmirror_mirror_queued


def mirror_counts(samples: list[Sample]) -> dict[str, MirrorCounts]:
    """Each shadow's counters, by shadow name."""
    counts: dict[str, MirrorCounts] = {}
    for sample in samples:
        if "shadow" not in sample.labels:
            continue
        shadow = counts.setdefault(sample.labels["shadow"], MirrorCounts())
        if sample.name == "mlmirror_mirror_requests_total":
            shadow.results[sample.labels["result"]] = sample.value
        elif sample.name == "mlmirror_mirror_dropped_total":
            shadow.drops[sample.labels["reason"]] = sample.value
        elif sample.name in ("mlmirror_mirror_inflight", "mlmirror_mirror_queued"):
            shadow.pending += sample.value
    return counts


def drift_counts(samples: list[Sample]) -> dict[str, float]:
    """The drift engines' counters (``DRIFT_TOTALS``), summed over routes."""
    return {name: total(samples, name) for name in DRIFT_TOTALS}


def wait_attached(admin: int, timeout: float = 30.0) -> None:
    """Wait until the mlmirror observer with admin port ``admin`` is attached to Envoy's tap (``envoy_tap``)."""
    deadline = time.monotonic() + timeout
    while total(metric_samples(admin), "mlmirror_envoy_tap_attached") < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the observer did not attach to Envoy's tap")
        time.sleep(0.1)

"""What a proxy's admin ``/metrics`` says about client calls and shadow copies, and the copy accounting."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Copies", "Scrape", "scrape"]


@dataclass
class Copies:
    """One shadow's copies: finished by result, dropped by reason, pending (in flight + queued)."""

    finished: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)
    pending: float = 0.0

    def total(self) -> float:
        """finished + dropped + pending: every sampled copy is in exactly one of them."""
        return sum(self.finished.values()) + sum(self.dropped.values()) + self.pending


@dataclass
class Scrape:
    """The figures the chaos scenarios read: client calls answered by status, copies per shadow, observer errors,
    drift engine counters, fallbacks by (from, to, reason)."""

    calls: dict[str, float] = field(default_factory=dict)
    copies: dict[str, Copies] = field(default_factory=dict)
    observer_errors: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str, str], float] = field(default_factory=dict)

    @property
    def answered(self) -> float:
        return sum(self.calls.values())


def _parse(text: str) -> Scrape:
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if sample.name == "mlmirror_calls_total":
                out.calls[labels["grpc_code"]] = out.calls.get(labels["grpc_code"], 0.0) + value
            elif sample.name == "mlmirror_observer_errors_total":
                out.observer_errors[labels["observer"]] = value
            elif sample.name == "mlmirror_fallbacks_total":
                key = (labels["from_upstream"], labels["to"], labels["reason"])
                out.fallbacks[key] = out.fallbacks.get(key, 0.0) + value
            elif sample.name.startswith("mlmirror_drift_") and sample.name.endswith("_total"):
                name = sample.name + (f"{{{labels['reason']}}}" if "reason" in labels else "")
                out.drift[name] = out.drift.get(name, 0.0) + value
            elif "shadow" in labels:
                copies = out.copies.setdefault(labels["shadow"], Copies())
                if sample.name == "mlmirror_mirror_requests_total":
                    copies.finished[labels["result"]] = value
                elif sample.name == "mlmirror_mirror_dropped_total":
                    copies.dropped[labels["reason"]] = value
                elif sample.name in ("mlmirror_mirror_inflight", "mlmirror_mirror_queued"):
                    copies.pending += value
    return out


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def scrape(admin_port: int) -> Scrape:
    """Read and parse a proxy's ``/metrics`` (off the event loop)."""
    return _parse(await asyncio.to_thread(_get, admin_port))

"""The dashboard's history: a bounded ring of time buckets of what the page draws, sampled from the merged
``/status`` and ``/metrics`` of the process serving the admin endpoint (the supervisor in the default shape, so it
sees every worker and the observing process; the proxy itself with ``--single-process``).

While the page is open (its history was asked for in the last ``WATCHED`` seconds) one sample is taken every
``every`` seconds (2 s), otherwise one per bucket: the hour is kept either way, and the processes are asked for
their status and metrics five times less often while nobody looks. Samples fold into ``bucket``-second buckets
(10 s), of which the
last ``buckets`` (360: one hour) are kept. A bucket holds, per route (at most ``MAX_ROUTES``), counts that happened
in it (calls by code, by who served, fallbacks by reason, shadow copies dropped by reason), p50/p99 latency of
production and each shadow, the last shadow verdict, and the group's health. Drift and ground-truth windows are
kept as they close, the last ``buckets`` per route. The bound: 2.2 MiB per route for the hour with a drift window
of 8 series closing every bucket (measured in tests/test_dashboard.py), so under 40 MiB for ``MAX_ROUTES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MAX_ROUTES", "REJOIN", "WATCHED", "History", "quantile"]

log = logging.getLogger(__name__)

MAX_ROUTES = 16
WATCHED = 30.0  # seconds: after the page last asked for the history, it is still sampled every ``every`` seconds
REJOIN = 600.0  # seconds: a window's ground-truth quality may arrive this long after it ended

Status = Callable[[], Awaitable[dict[str, Any]]]
Exposition = Callable[[], Awaitable[tuple[bytes, str]]]


class History:
    """The ring. ``status`` and ``exposition``: the admin target's; ``thresholds``: route -> required agreement."""

    def __init__(
        self,
        status: Status,
        exposition: Exposition,
        thresholds: Callable[[], Mapping[str, float]] = dict,
        *,
        bucket: float = 10.0,
        buckets: int = 360,
        every: float = 2.0,
    ) -> None:
        if bucket <= 0 or buckets < 1 or every <= 0:
            raise ValueError("history: bucket and every must be positive seconds, buckets at least 1")
        self._status, self._exposition, self._thresholds = status, exposition, thresholds
        self.bucket, self.every = bucket, every
        self._ring: deque[dict[str, Any]] = deque(maxlen=buckets)
        self._windows: dict[str, deque[dict[str, Any]]] = {}
        self._seen: set[tuple] = set()
        self._last: dict[tuple, float] = {}  # cumulative counter values of the previous sample
        self._hist: dict[tuple[str, str], dict[float, float]] = {}  # the open bucket's latency histograms (deltas)
        self._task: asyncio.Task[None] | None = None
        self._viewed = -math.inf  # time.monotonic() of the last snapshot
        self._wake = asyncio.Event()
        self.latest: dict[str, Any] = {}

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def watched(self) -> bool:
        """Whether the page asked for the history in the last ``WATCHED`` seconds."""
        return time.monotonic() - self._viewed < WATCHED

    @property
    def pause(self) -> float:
        """Seconds from one sample to the next: ``every`` while watched, else a bucket (at least ``every``)."""
        return self.every if self.watched else max(self.every, self.bucket)

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("dashboard history: a sample failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # a page opened meanwhile wakes it
                await asyncio.wait_for(self._wake.wait(), self.pause)

    def snapshot(self, since: float = 0.0) -> dict[str, Any]:
        """JSON-ready: the buckets still open at ``since`` (Unix seconds) or later, the drift windows that ended
        after ``since`` minus ``REJOIN`` seconds (ground truth joins a window late), the latest status. The page
        asks for everything once, then ``since`` its last bucket: a whole hour is about 1 MB of JSON."""
        if not self.watched:
            self._wake.set()  # sample again now, and every ``every`` seconds while the page keeps asking
        self._viewed = time.monotonic()
        windows_after = since - REJOIN if since else 0.0
        return {
            "bucket_seconds": self.bucket,
            "every_seconds": self.every,
            "buckets": [b for b in self._ring if b["t"] + self.bucket > since],
            "windows": {
                route: [w for w in windows if (w["ended"] or 0.0) > windows_after]
                for route, windows in self._windows.items()
            },
            "status": self.latest,
        }

    async def sample(self, now: float | None = None) -> None:
        """Take one sample of the status and the metrics into the current bucket."""
        status = await self._status()
        body, _ = await self._exposition()
        now = time.time() if now is None else now
        self.latest = status
        start = math.floor(now / self.bucket) * self.bucket
        if not self._ring or self._ring[-1]["t"] != start:
            self._ring.append({"t": start, "seconds": 0.0, "routes": {}, "health": {}})
            self._hist = {}
        into = self._ring[-1]
        into["seconds"] = round(now - start, 3) or self.every
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        thresholds = self._thresholds()
        for route in status.get("routes", [])[:MAX_ROUTES]:
            self._route(into["routes"].setdefault(route["name"], {}), route, families, thresholds)
        self._health(into["health"], status, families)

    def _delta(self, key: tuple, value: float) -> float:
        last = self._last.get(key)
        self._last[key] = value
        if last is None:
            return 0.0  # the first sample is the baseline
        return value - last if value >= last else value  # a counter that restarted (a child did) counts from 0

    def _add(self, into: dict[str, float], name: str, key: tuple, value: float) -> None:
        into[name] = into.get(name, 0.0) + self._delta(key, value)

    def _route(self, into: dict[str, Any], route: dict[str, Any], families: dict, thresholds: Mapping) -> None:
        name = route["name"]
        calls = into.setdefault("calls", {})
        for code, n in route.get("calls", {}).items():
            self._add(calls, code, ("calls", name, code), n)
        served = into.setdefault("served", {})
        fallbacks = into.setdefault("fallbacks", {})
        for sample in _samples(families, "mlmirror_requests", "_total", route=name):
            if sample.labels.get("grpc_code") == "OK" and sample.labels.get("role") in ("primary", "fallback"):
                served_by = ("served", name, sample.labels["role"], sample.labels["upstream"])
                self._add(served, sample.labels["role"], served_by, sample.value)
        for sample in _samples(families, "mlmirror_fallbacks", "_total", route=name):
            key = ("fallbacks", name, sample.labels["reason"], sample.labels["to"], sample.labels["from_upstream"])
            self._add(fallbacks, sample.labels["reason"], key, sample.value)
            if sample.labels["to"] == "static":
                self._add(served, "static", ("static", *key[1:]), sample.value)
        latency = into.setdefault("latency", {})
        for series, metric, labels in (
            ("production", "mlmirror_request_duration_seconds", {"route": name, "role": "primary"}),
            *((f"shadow {s['name']}", "mlmirror_shadow_latency_seconds", {"route": name, "shadow": s["name"]})
              for s in route.get("shadows", [])),
        ):  # fmt: skip
            counts = self._hist.setdefault((name, series), {})
            for sample in _samples(families, metric, "_bucket", **labels):
                bound = float(sample.labels["le"])
                key = ("hist", name, series, bound, *sorted(sample.labels.items()))
                counts[bound] = counts.get(bound, 0.0) + self._delta(key, sample.value)
            if counts:
                latency[series] = {"p50": quantile(0.5, counts), "p99": quantile(0.99, counts)}
        shadows = into.setdefault("shadows", {})
        for shadow in route.get("shadows", []):
            window = shadow.get("window", {})
            entry = shadows.setdefault(shadow["name"], {"dropped": {}})
            entry.update(
                agreement=window.get("agreement"), lower_bound=window.get("lower_bound"), samples=window.get("samples"),
                mae=window.get("mae"), rmse=window.get("rmse"), promotable=shadow.get("promotable"),
                reasons=shadow.get("reasons", []), threshold=thresholds.get(name),
            )  # fmt: skip
            for reason, n in shadow.get("dropped", {}).items():
                self._add(entry["dropped"], reason, ("dropped", name, shadow["name"], reason), n)
        self._drift(name, route.get("drift") or {})

    def _drift(self, route: str, drift: dict[str, Any]) -> None:
        windows = self._windows.setdefault(route, deque(maxlen=self._ring.maxlen))
        for window in drift.get("latest", []):
            key = ("drift", route, window["model"], window["version"], window["index"])
            if key in self._seen:
                continue
            self._seen.add(key)
            entry = {
                "model": window["model"],
                "version": window["version"],
                "index": window["index"],
                "ended": window.get("ended"),
                "share": window.get("feature_drift_share"),
                "drifted": window.get("drifted", []),
                "multivariate": window.get("multivariate"),
                "attribution": None
                if not window.get("attribution")
                else {k: window["attribution"][k] for k in ("ndcg", "drifted")},
                "series": [
                    {
                        "name": s["name"],
                        "kind": s["kind"],
                        "method": s["method"],
                        "drifted": s["drifted"],
                        "score": s["scores"].get(s["method"]),
                        "threshold": s.get("threshold"),
                    }
                    for s in window.get("series", [])
                ],
                "quality": None,
            }
            windows.append(entry)
        truth = drift.get("ground_truth") or {}
        for quality in truth.get("latest", []):
            for window in windows:
                if (window["version"], window["index"]) == (quality["version"], quality["index"]):
                    window["quality"] = quality["metrics"]
        if len(self._seen) > 4 * (self._ring.maxlen or 1) * MAX_ROUTES:  # bound the keys of windows long gone
            kept = {("drift", route, w["model"], w["version"], w["index"]) for w in windows}
            self._seen = {k for k in self._seen if k[1] != route} | kept

    def _health(self, into: dict[str, Any], status: dict[str, Any], families: dict) -> None:
        into["circuits"] = {name: u.get("circuit", {}).get("state") for name, u in status.get("upstreams", {}).items()}
        lags = [s.value for s in _samples(families, "mlmirror_event_loop_lag_seconds", "")]
        into["lag_seconds"] = max(lags, default=status.get("event_loop", {}).get("lag_seconds", 0.0))
        observer = status.get("observer")
        into["observer_up"] = None if observer is None else observer.get("up")
        sent = sum(s.value for s in _samples(families, "mlmirror_handoff_sent", "_total"))
        received = sum(s.value for s in _samples(families, "mlmirror_handoff_received", "_total"))
        into["handoff_in_flight"] = max(sent - received, 0.0) if observer is not None else None
        dropped = into.setdefault("handoff_dropped", {})
        for sample in _samples(families, "mlmirror_handoff_dropped", "_total"):
            self._add(dropped, sample.labels["reason"], ("handoff", sample.labels["reason"]), sample.value)
        reloads = into.setdefault("reloads", {})
        for result, n in status.get("config_reloads", {}).items():
            self._add(reloads, result, ("reloads", result), n)


def _samples(families: dict, family: str, suffix: str, **labels: str) -> list:
    found = families.get(family)
    if found is None:
        return []
    name = family + suffix
    return [s for s in found.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile (seconds) of cumulative histogram ``buckets`` (upper bound -> count), interpolated within
    a bucket as Prometheus's histogram_quantile does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = bound, count
    return lower

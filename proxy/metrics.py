"""Every Prometheus metric mlmirror exports, defined once.

Each ``Metrics`` owns its own registry, so several proxies can live in one process (tests) without clashing.
What every call updates (``RouteMetrics``) is kept as plain numbers and exported at scrape time: a call costs a
few dictionary updates, not prometheus-client's locks and label lookups.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from mlmirror import __version__
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["LATENCY_BUCKETS", "Metrics", "RouteMetrics"]

# `_created` series double every counter's cardinality and carry nothing Prometheus needs here.
disable_created_metrics()

#: Upper bounds (seconds) of the latency histogram buckets: 250 µs to 10 s.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The proxy's metrics, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        #: Per-route hot-path statistics by route name; they outlive reloads so that counters never go back.
        self.routes: dict[str, RouteMetrics] = {}
        r.register(_CallStatsCollector(self.routes))
        self.observer_errors = Counter(
            "mlmirror_observer_errors",
            "Answered calls an observer (mirror, drift engine) raised on; the calls were not affected.",
            ["observer"],
            registry=r,
        )
        self.unrouted_calls = Counter(
            "mlmirror_unrouted_calls", "Client calls that matched no route (answered UNIMPLEMENTED).", registry=r
        )
        self.fallbacks = Counter(
            "mlmirror_fallbacks",
            "Moves along a route's fallback chain: from an upstream to the next target, and why.",
            ["route", "from_upstream", "to", "reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "mlmirror_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open.", ["upstream"], registry=r
        )
        self.circuit_ejections = Counter(
            "mlmirror_circuit_ejections", "Times an upstream's circuit opened.", ["upstream"], registry=r
        )
        self.upstream_up = Gauge(
            "mlmirror_upstream_up",
            "1 when the last health check of the upstream passed, else 0.",
            ["upstream"],
            registry=r,
        )
        self.config_reloads = Counter(
            "mlmirror_config_reloads", "Configuration reloads, by result (success, failure).", ["result"], registry=r
        )
        self.config_last_reload_success = Gauge(
            "mlmirror_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration (re)load that took effect.",
            registry=r,
        )
        self.inflight_calls = Gauge("mlmirror_inflight_calls", "Client calls being served now.", registry=r)
        self.ready = Gauge("mlmirror_ready", "1 when /readyz answers ready, else 0.", registry=r)
        self.event_loop_lag = Gauge(
            "mlmirror_event_loop_lag_seconds", "How late the event loop woke up at its last measurement.", registry=r
        )
        self.mirror_shedding = Gauge(
            "mlmirror_mirror_shedding", "1 while mirror copies are shed because the event loop runs late.", registry=r
        )
        self.extproc_streams = Counter(
            "mlmirror_extproc_streams",
            "Observer mode: Envoy ext_proc streams that ended, by outcome (observed, streaming, compressed, too_large,"
            " incomplete, malformed, unrouted).",
            ["outcome"],
            registry=r,
        )
        self.extproc_active_streams = Gauge(
            "mlmirror_extproc_active_streams", "Observer mode: Envoy ext_proc streams open now.", registry=r
        )
        self.envoy_tap_traces = Counter(
            "mlmirror_envoy_tap_traces",
            "Observer mode with envoy_tap: calls read from Envoy's tap, by outcome (observed, too_large, streaming,"
            " compressed, incomplete, malformed, unrouted).",
            ["outcome"],
            registry=r,
        )
        self.envoy_tap_sessions = Counter(
            "mlmirror_envoy_tap_sessions",
            "Observer mode with envoy_tap: attachments to Envoy's /tap admin that ended, by outcome (flushed: a batch"
            " read whole; refused: Envoy said no; failed: no connection, or it broke).",
            ["outcome"],
            registry=r,
        )
        self.envoy_tap_attached = Gauge(
            "mlmirror_envoy_tap_attached", "Observer mode with envoy_tap: 1 while attached to Envoy's tap.", registry=r
        )
        self.process_tasks = Gauge(
            "mlmirror_process_tasks",
            "asyncio tasks alive on the proxy's event loop (calls being relayed, shadow copies, health checks).",
            registry=r,
        )
        Info("mlmirror_build", "mlmirror version.", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total

    def for_route(self, route: str) -> RouteMetrics:
        """The statistics of ``route``, created on first use and kept across reloads."""
        stats = self.routes.get(route)
        if stats is None:
            stats = self.routes[route] = RouteMetrics(self, route)
        return stats


class RouteMetrics:
    """The hot-path statistics of one route: plain numbers updated on the event loop, no lock, no label lookup.

    They become ``mlmirror_requests_total``, ``mlmirror_request_duration_seconds`` and ``mlmirror_calls_total`` when
    scraped (``_CallStatsCollector``). Status codes are given by name (``"OK"``, ``"UNAVAILABLE"``).
    """

    __slots__ = ("_metrics", "answers", "attempts", "durations", "route")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self.route = route
        #: (upstream, role, code) -> calls
        self.attempts: dict[tuple[str, str, str], int] = {}
        #: (upstream, role) -> calls per latency bucket (the last one is +Inf), then the sum of seconds
        self.durations: dict[tuple[str, str], list[float]] = {}
        #: code -> client calls answered with it
        self.answers: dict[str, int] = {}

    def attempt(self, upstream: str, role: str, code: str, seconds: float) -> None:
        """Record one upstream call (or the static default, with upstream ``static-default``)."""
        key = (upstream, role, code)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        histogram = self.durations.get((upstream, role))
        if histogram is None:
            histogram = self.durations[(upstream, role)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        histogram[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bucket whose upper bound is >= seconds
        histogram[-1] += seconds

    def answered(self, code: str) -> None:
        """Record the status the client received."""
        self.answers[code] = self.answers.get(code, 0) + 1

    def fallback(self, from_upstream: str, to: str, reason: str) -> None:
        self._metrics.fallbacks.labels(self.route, from_upstream, to, reason).inc()


class _CallStatsCollector(Collector):
    """Exports every route's ``RouteMetrics`` as Prometheus families at scrape time."""

    def __init__(self, routes: dict[str, RouteMetrics]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "mlmirror_requests",
            "Calls made to upstreams (each attempt of the fallback chain counts), by outcome.",
            labels=["route", "upstream", "role", "grpc_code"],
        )
        durations = HistogramMetricFamily(
            "mlmirror_request_duration_seconds",
            "Time from sending a call to an upstream to its final status, in seconds.",
            labels=["route", "upstream", "role"],
        )
        calls = CounterMetricFamily(
            "mlmirror_calls", "Client calls answered by the proxy, by the status the client received.",
            labels=["route", "grpc_code"],
        )  # fmt: skip
        bounds = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]
        for route, stats in list(self._routes.items()):
            for (upstream, role, code), n in list(stats.attempts.items()):
                requests.add_metric([route, upstream, role, code], n)
            for (upstream, role), histogram in list(stats.durations.items()):
                cumulative = list(accumulate(histogram[:-1]))
                durations.add_metric([route, upstream, role], list(zip(bounds, cumulative, strict=True)), histogram[-1])
            for code, n in list(stats.answers.items()):
                calls.add_metric([route, code], n)
        yield requests
        yield durations
        yield calls

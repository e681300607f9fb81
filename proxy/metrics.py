"""Every Prometheus metric mlmirror exports, defined once.

Each ``Metrics`` owns its own registry, so several proxies can live in one process (tests) without clashing.
Label children used on the hot path are cached by ``RouteMetrics`` so a call costs dictionary lookups, not
label-tuple construction.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from . import __version__

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
        self.requests = Counter(
            "mlmirror_requests",
            "Calls made to upstreams (each attempt of the fallback chain counts), by outcome.",
            ["route", "upstream", "role", "grpc_code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mlmirror_request_duration_seconds",
            "Time from sending a call to an upstream to its final status, in seconds.",
            ["route", "upstream", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.calls = Counter(
            "mlmirror_calls",
            "Client calls answered by the proxy, by the status the client received.",
            ["route", "grpc_code"],
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
        Info("mlmirror_build", "mlmirror version.", registry=r).info({"version": __version__})

    def for_route(self, route: str) -> RouteMetrics:
        return RouteMetrics(self, route)


class RouteMetrics:
    """The hot-path view of the metrics for one route, with cached label children."""

    __slots__ = ("_attempts", "_calls", "_metrics", "route")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self.route = route
        self._attempts: dict[tuple[str, str, grpc.StatusCode], tuple] = {}
        self._calls: dict[grpc.StatusCode, object] = {}

    def attempt(self, upstream: str, role: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record one upstream call (or the static default, with upstream ``static-default``)."""
        key = (upstream, role, code)
        children = self._attempts.get(key)
        if children is None:
            m = self._metrics
            children = (
                m.requests.labels(self.route, upstream, role, code.name),
                m.request_duration.labels(self.route, upstream, role),
            )
            self._attempts[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def answered(self, code: grpc.StatusCode) -> None:
        """Record the status the client received."""
        child = self._calls.get(code)
        if child is None:
            child = self._calls[code] = self._metrics.calls.labels(self.route, code.name)
        child.inc()

    def fallback(self, from_upstream: str, to: str, reason: str) -> None:
        self._metrics.fallbacks.labels(self.route, from_upstream, to, reason).inc()

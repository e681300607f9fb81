"""What ``/status`` shows for one proxy process, JSON-ready: the process, its routes (with each route's parts:
shadows, drift, capture, ...), its upstreams, reloads, the event loop and the promotions made."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mlmirror import __version__
from prometheus_client import Counter

if TYPE_CHECKING:
    from mlmirror.runtime.proxy import Proxy

__all__ = ["proxy_status", "readiness"]


def readiness(proxy: Proxy, mode: str) -> tuple[bool, dict[str, str]]:
    """(ready, reason per route): ready when not draining and every route has a reachable, non-ejected upstream.
    A static default does not count: it answers, but it is not a model."""
    assert proxy.table is not None
    if proxy.draining:
        return False, {"proxy": "draining: shutting down"}
    if proxy.role.hub:  # the workers carry the calls
        return True, {"proxy": "hub: watching the calls the workers hand off"}
    if mode == "observer":  # Envoy carries the calls; the observer needs no upstream
        return True, {"proxy": "observing calls Envoy carries (ext_proc, or its tap)"}
    reasons = {}
    ready = True
    for route in proxy.table.routes:
        route_ready, reasons[route.name] = route.readiness()
        ready = ready and route_ready
    return ready, reasons


def proxy_status(proxy: Proxy) -> dict[str, object]:
    """Everything ``/status`` shows for ``proxy`` (started: it has a route table)."""
    table = proxy.table
    assert table is not None
    ready, _ = proxy.readiness()
    route_readiness = {route.name: route.readiness() for route in table.routes}
    fallbacks = counter_values(proxy.metrics.fallbacks, ("route", "to"))
    reloads = counter_values(proxy.metrics.config_reloads, ("result",))
    by_upstream: dict[str, dict[str, int]] = {}
    for stats in proxy.metrics.routes.values():
        for (upstream, _role, code), n in stats.attempts.items():
            counts = by_upstream.setdefault(upstream, {})
            counts[code] = counts.get(code, 0) + n
    lag = proxy.lag
    return {
        "version": __version__,
        "config": table.config.source,
        "uptime_seconds": round(time.time() - proxy.started_at, 3),
        "ready": ready,
        "draining": proxy.draining,
        "inflight_calls": proxy.inflight_calls(),
        "tasks": proxy.tasks(),
        "listen": {"grpc": proxy.listen_address, "port": proxy.grpc_port, "admin": proxy.admin_address},
        "routes": [
            {
                "name": route.name,
                "match": {"method": route.spec.match.method, "model": route.spec.match.model},
                "primary": route.spec.primary,
                "fallback": list(route.spec.fallback),
                "static_default": route.static is not None,
                "ready": route_readiness[route.name][0],
                "detail": route_readiness[route.name][1],
                "calls": dict(sorted(route.metrics.answers.items())),
                "fallbacks": {to: int(n) for (name, to), n in sorted(fallbacks.items()) if name == route.name},
                **proxy.parts.status(route.name),
            }
            for route in table.routes
        ],
        "upstreams": {
            name: {**target.snapshot(), "requests": dict(sorted(by_upstream.get(name, {}).items()))}
            for name, target in table.targets.items()
        },
        "config_reloads": {result: int(n) for (result,), n in reloads.items()},
        "event_loop": {
            "lag_seconds": round(lag.lag, 6),
            "max_lag_seconds": round(lag.max_lag, 6),
            "shedding_mirrors": lag.overloaded,
        },
        "promotions": proxy.promotions,
        **({"intake": proxy.role.intake()} if proxy.role.intake is not None else {}),
        **({"envoy_tap": envoy_tap_status(proxy)} if proxy.envoy_tap is not None else {}),
    }


def envoy_tap_status(proxy: Proxy) -> dict[str, object]:
    """Observer mode reading Envoy's tap: where, attached or why not, batches and calls by outcome."""
    reader, metrics = proxy.envoy_tap, proxy.metrics
    assert reader is not None
    return {
        "admin": reader.admin,
        "attached": reader.attached,
        "problem": reader.problem,
        "sessions": {outcome: int(n) for (outcome,), n in sorted(counter_values(metrics.envoy_tap_sessions,
                                                                                  ("outcome",)).items())},
        "calls": {outcome: int(n) for (outcome,), n in sorted(counter_values(metrics.envoy_tap_traces,
                                                                               ("outcome",)).items())},
    }  # fmt: skip


def counter_values(counter: Counter, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Sum a prometheus-client counter's ``_total`` samples by the given labels."""
    totals: dict[tuple[str, ...], float] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = tuple(sample.labels[name] for name in labels)
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals

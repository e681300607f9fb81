"""One generation of the configuration, compiled for serving: routes with their live upstreams, a router, and a
count of the calls still running on it.

A reload builds a new ``RouteTable`` and swaps it in; calls that started on the old table keep their references
and finish on it. Once the old table is retired and its last call has finished, ``drained`` is set and upstreams
that only it used can be closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from mlmirror.config import Config, Route
from mlmirror.handoff.tap import Observer, Tap
from mlmirror.metrics import Metrics, RouteMetrics
from mlmirror.observing.shadows.mirror import RouteMirror
from mlmirror.serving.router import KNOWN_CALL_TYPES, Router
from mlmirror.serving.sampling import RequestIds
from mlmirror.serving.static_response import StaticResponder
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["RouteRuntime", "RouteTable"]


class RouteRuntime:
    """A route ready to serve: its spec, its upstream chain in order, static default, metrics, shadow mirror, and
    the tap that feeds its answered calls to observers (the proxy's and its own mirror)."""

    __slots__ = ("chain", "fallback_on", "ids", "metrics", "mirror", "name", "spec", "static", "tap")

    def __init__(
        self,
        spec: Route,
        targets: Mapping[str, UpstreamTarget],
        metrics: Metrics,
        tap: Tap,
        mirror: RouteMirror | None,
        ids: RequestIds,
        drift: Observer | None = None,
        capture: Observer | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.chain = tuple(targets[name] for name in spec.chain)
        self.fallback_on = spec.fallback_on
        self.static = StaticResponder(spec.static_response) if spec.static_response is not None else None
        self.metrics: RouteMetrics = metrics.for_route(spec.name)
        self.mirror = mirror
        self.tap = tap.with_observers([o for o in (mirror, drift, capture) if o is not None])
        self.ids = ids

    def readiness(self) -> tuple[bool, str]:
        """Ready when some upstream of the chain is reachable and not ejected; the reason in words either way."""
        for target in self.chain:
            if target.available:
                return True, f"served by {target.name}"
        reasons = "; ".join(
            f"{t.name}: circuit open" if t.reachable else f"{t.name}: {t.health_detail}" for t in self.chain
        )
        return False, f"no reachable upstream ({reasons})"


class RouteTable:
    """Routes of one configuration generation and the bookkeeping of the calls that use them."""

    def __init__(
        self,
        config: Config,
        targets: Mapping[str, UpstreamTarget],
        metrics: Metrics,
        tap: Tap,
        mirrors: Mapping[str, RouteMirror] | None = None,
        ids: RequestIds | None = None,
        drift: Mapping[str, Observer] | None = None,
        captures: Mapping[str, Observer] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.targets = dict(targets)
        mirrors = mirrors or {}
        ids = ids or RequestIds()
        drift, captures = drift or {}, captures or {}
        self.routes = tuple(
            RouteRuntime(
                route, self.targets, metrics, tap, mirrors.get(route.name), ids, drift.get(route.name),
                captures.get(route.name),
            )
            for route in config.routes
        )  # fmt: skip
        self.router: Router[RouteRuntime] = Router([(route.spec.match, route) for route in self.routes])
        self._call_types = {**KNOWN_CALL_TYPES, **config.method_types}
        self.inflight = 0
        self.retired = False
        self.drained = asyncio.Event()

    def route_for(self, method: str, request: bytes | None) -> tuple[RouteRuntime | None, str | None]:
        """(route, KServe model name) for a call; ``request`` is None for streamed requests (routed by method)."""
        model = self.router.model_of(method, request) if request is not None else None
        return self.router.route(method, model), model

    def call_type(self, method: str) -> str:
        """How ``method`` is relayed: its configured or known call type, else stream-stream (correct for any)."""
        return self._call_types.get(method, "stream_stream")

    def release(self) -> None:
        """One call on this table has finished."""
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self.drained.set()

    def retire(self) -> None:
        """No new call will start on this table."""
        self.retired = True
        if self.inflight == 0:
            self.drained.set()

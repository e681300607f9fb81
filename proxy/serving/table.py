"""One generation of the configuration, compiled for serving: routes with their live upstreams, a router, and a
count of the calls still running on it.

A reload builds a new ``RouteTable`` and swaps it in; calls that started on the old table keep their references
and finish on it. Once the old table is retired and its last call has finished, ``drained`` is set and upstreams
that only it used can be closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from mlmirror.config import Config, Route
from mlmirror.handoff.tap import Observer, Tap
from mlmirror.metrics import Metrics, RouteMetrics
from mlmirror.serving.router import KNOWN_CALL_TYPES, Router
from mlmirror.serving.sampling import RequestIds
from mlmirror.serving.static_response import StaticResponder
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["RouteRuntime", "RouteTable"]


class RouteRuntime:
    """A route ready to serve: its spec, its upstream chain in order, static default, metrics, and the tap that
    feeds its answered calls to observers (the proxy's, then the route's own: its shadows, drift, capture ...)."""

    __slots__ = ("chain", "fallback_on", "ids", "metrics", "name", "spec", "static", "tap")

    def __init__(
        self,
        spec: Route,
        targets: Mapping[str, UpstreamTarget],
        metrics: Metrics,
        tap: Tap,
        ids: RequestIds,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.chain = tuple(targets[name] for name in spec.chain)
        self.fallback_on = spec.fallback_on
        self.static = StaticResponder(spec.static_response) if spec.static_response is not None else None
        self.metrics: RouteMetrics = metrics.for_route(spec.name)
        self.tap = tap.with_observers(observers)
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
    """Routes of one configuration generation and the bookkeeping of the calls that use them. ``observers``: each
    route's own observers, by route name."""

    def __init__(
        self,
        config: Config,
        targets: Mapping[str, UpstreamTarget],
        metrics: Metrics,
        tap: Tap,
        ids: RequestIds | None = None,
        observers: Mapping[str, Sequence[Observer]] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.targets = dict(targets)
        ids = ids or RequestIds()
        observers = observers or {}
        self.routes = tuple(
            RouteRuntime(route, self.targets, metrics, tap, ids, observers.get(route.name, ()))
            for route in config.routes
        )
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

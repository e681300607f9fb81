"""Per-route consumers ("parts"): what a route's answered calls feed beyond its metrics, built from its config.

A *kind* of part (shadows, drift, capture, ...) is one module that declares a ``PartKind``: the route config key it
reads, a factory ``build(route, context) -> RoutePart``, and the Prometheus collector that exports every part of the
kind. The registry (proxy/observing/kinds.py) lists the kinds; ``RouteParts`` builds, reloads and stops them for
a process, so the proxy never names a kind.

A ``RoutePart`` is a tap observer (``offer``) with ``status()`` (its JSON-ready ``/status`` entry) and lifecycle
hooks. On a reload, ``RouteParts.rebuild`` asks each existing part for its ``reloaded(route, context)`` successor
(itself when its settings are unchanged, so it keeps its state; else a new part, which may take over some of its
pieces), builds parts for routes that gained the kind, and only when every part was built (any may refuse the
config with ``StartError``) closes the parts replaced or removed — ``close(successor)`` — and starts the new ones.
So a refused reload changes nothing.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from mlmirror.config import Route
from mlmirror.handoff.tap import CallRecord
from mlmirror.looplag import LoopLag
from mlmirror.serving.upstream import UpstreamTarget
from prometheus_client.registry import Collector

__all__ = ["PartContext", "PartKind", "RoutePart", "RouteParts", "Shelf"]

S = TypeVar("S", bound="Shelf")


class Shelf(Protocol):
    """State a kind keeps for the whole process, across route tables (say, capture writers still finishing)."""

    async def stop(self) -> None: ...


@dataclass
class PartContext:
    """What every factory may use: the upstreams of the table being built, the event-loop lag monitor, whether this
    process's event loop serves clients (``serving``: false in the observing process), and one shelf per kind for
    state that outlives a table."""

    lag: LoopLag
    targets: Mapping[str, UpstreamTarget] = field(default_factory=dict)
    shelves: dict[str, Shelf] = field(default_factory=dict)
    serving: bool = True
    #: the observing process: waits while every serving worker is busy (proxy/observing/servinggate.py)
    wait_for_serving: Callable[[], None] | None = None

    def shelf(self, key: str, make: Callable[[], S]) -> S:
        """The kind ``key``'s shelf, made by ``make()`` on first use."""
        if key not in self.shelves:
            self.shelves[key] = make()
        return self.shelves[key]  # type: ignore[return-value]


class RoutePart:
    """One route's consumer of one kind. Subclasses set ``name`` (the tap's label for its errors) and implement
    ``offer`` and ``status``; the hooks default to doing nothing."""

    name: str

    def offer(self, record: CallRecord) -> None:
        """Take one answered call in constant time (the tap's contract: never block, never await)."""
        raise NotImplementedError

    def status(self) -> object:
        """The part's ``/status`` entry, JSON-ready."""
        raise NotImplementedError

    def reloaded(self, route: Route, context: PartContext) -> RoutePart:
        """The part for ``route`` after a reload: ``self`` when nothing it depends on changed, else a new part (not
        started). May raise ``StartError``. By default the part is kept."""
        return self

    async def check(self, first: UpstreamTarget) -> None:
        """At start, once listening: refuse to run (``StartError``) when the route's model does not fit the part."""

    def start(self) -> None:
        """Begin work (threads, tasks): called once, after every part of the table was built."""

    def close(self, successor: RoutePart | None) -> None:
        """Taken out of service by a reload (``successor`` replaces it, None: the route lost the kind): take no
        more records, release what the successor did not take over. Must return at once."""

    async def stop(self) -> None:
        """The process stops: finish what is queued, flush, join threads."""


@dataclass(frozen=True, slots=True)
class PartKind:
    """One kind of per-route consumer.

    ``key``: the route's config section and its ``/status`` key; ``configured(route)``: whether a route has one;
    ``build(route, context)``: the factory (may raise ``StartError``; must not start anything);
    ``collector(parts)``: a Prometheus collector over the live parts of the kind (``parts()`` gives them);
    ``absent``: the ``/status`` value of a route without one.
    """

    key: str
    configured: Callable[[Route], bool]
    build: Callable[[Route, PartContext], RoutePart]
    collector: Callable[[Callable[[], list[Any]]], Collector]
    absent: object = None


class RouteParts:
    """The parts of the current route table, for every kind in ``kinds``."""

    def __init__(self, kinds: Sequence[PartKind], context: PartContext) -> None:
        self.kinds = tuple(kinds)
        self.context = context
        self._parts: dict[str, dict[str, RoutePart]] = {kind.key: {} for kind in self.kinds}

    def collectors(self) -> list[Collector]:
        """One collector per kind, reading the live parts at scrape time."""
        return [kind.collector(functools.partial(self.of_kind, kind.key)) for kind in self.kinds]

    def rebuild(self, routes: Iterable[Route], targets: Mapping[str, UpstreamTarget]) -> None:
        """Parts for ``routes`` (see the module docstring). Raises ``StartError`` with nothing changed."""
        self.context.targets = targets
        routes = tuple(routes)
        built: dict[str, dict[str, RoutePart]] = {}
        for kind in self.kinds:
            current = self._parts[kind.key]
            built[kind.key] = {}
            for route in routes:
                if not kind.configured(route):
                    continue
                previous = current.get(route.name)
                part = previous.reloaded(route, self.context) if previous else kind.build(route, self.context)
                built[kind.key][route.name] = part
        for kind in self.kinds:
            current, new = self._parts[kind.key], built[kind.key]
            for name, part in current.items():
                successor = new.get(name)
                if successor is not part:
                    part.close(successor)
            kept = set(map(id, current.values()))
            for part in new.values():
                if id(part) not in kept:
                    part.start()
        self._parts = built

    def of_route(self, route: str) -> list[RoutePart]:
        """The route's parts, in registry order: the observers its tap feeds."""
        return [parts[route] for parts in self._parts.values() if route in parts]

    def get(self, route: str, key: str) -> Any:
        """The route's part of kind ``key``, or None."""
        return self._parts.get(key, {}).get(route)

    def of_kind(self, key: str) -> list[Any]:
        return list(self._parts.get(key, {}).values())

    def status(self, route: str) -> dict[str, object]:
        """The route's ``/status`` entries, one per kind (``absent`` for a kind the route does not have)."""
        entries = {}
        for kind in self.kinds:
            part = self._parts[kind.key].get(route)
            entries[kind.key] = part.status() if part is not None else copy.copy(kind.absent)
        return entries

    def __iter__(self) -> Iterator[RoutePart]:
        for parts in self._parts.values():
            yield from parts.values()

    async def stop(self) -> None:
        """Stop every part, then every shelf (what replaced parts left finishing)."""
        for part in list(self):
            await part.stop()
        for shelf in self.context.shelves.values():
            await shelf.stop()

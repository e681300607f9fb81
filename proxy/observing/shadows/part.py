"""The shadows of a route as a per-route part (proxy/observing/parts.py): config ``routes[].shadows``.

A reload keeps each shadow whose settings, upstream, comparison and promotion policy are unchanged (with its
statistics and verdict window); the others are closed and started afresh.
"""

from __future__ import annotations

from mlmirror.config import Route
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.parts import PartContext, PartKind, RoutePart
from mlmirror.observing.shadows.mirror import RouteMirror, ShadowMirror
from mlmirror.observing.shadows.report import ShadowCollector, shadow_status
from mlmirror.observing.shadows.verdict import Verdict

__all__ = ["KIND", "ShadowsPart"]


class ShadowsPart(RoutePart):
    """A route's shadow mirrors (``mirror``: the tap observer that hands each call to every shadow)."""

    def __init__(self, route: Route, context: PartContext, kept: dict[str, ShadowMirror] | None = None) -> None:
        kept = kept or {}
        shadows = []
        for spec in route.shadows:
            target = context.targets[spec.upstream]
            existing = kept.get(spec.name)
            if existing is not None and existing.same_as(spec, target, route.compare, route.promotion):
                shadows.append(existing)
            else:
                shadows.append(ShadowMirror(route.name, spec, target, route.compare, route.promotion, context.lag))
        self.mirror = RouteMirror(route.name, shadows, route.promotion, route.redact)
        self.name = self.mirror.name

    def shadow(self, name: str) -> ShadowMirror:
        """The route's shadow ``name`` (KeyError when it has none by that name)."""
        for shadow in self.mirror.shadows:
            if shadow.name == name:
                return shadow
        raise KeyError(name)

    def verdict(self, name: str) -> Verdict:
        """The current verdict of shadow ``name``."""
        return self.mirror.verdicts()[name][1]

    def offer(self, record: CallRecord) -> None:
        self.mirror.offer(record)

    def status(self) -> object:
        return shadow_status(self.mirror)

    def reloaded(self, route: Route, context: PartContext) -> RoutePart:
        return ShadowsPart(route, context, {shadow.name: shadow for shadow in self.mirror.shadows})

    def close(self, successor: RoutePart | None) -> None:
        taken = set(map(id, successor.mirror.shadows)) if isinstance(successor, ShadowsPart) else set()
        for shadow in self.mirror.shadows:
            if id(shadow) not in taken:
                shadow.close()

    async def stop(self) -> None:
        for shadow in self.mirror.shadows:
            shadow.close()


KIND = PartKind(
    key="shadows",
    configured=lambda route: bool(route.shadows),
    build=ShadowsPart,
    collector=lambda parts: ShadowCollector(lambda: [part.mirror for part in parts()]),
    absent=[],
)

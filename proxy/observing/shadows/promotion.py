"""Promoting a shadow: the configuration in which a route's shadow is its primary.

The promoted shadow's upstream becomes the primary (and leaves the fallback list if it was there). The old primary
becomes what the route's ``promotion.demote_to`` says: a shadow with the promoted shadow's settings (``shadow``,
the default, so the comparison goes on the other way round), the first fallback (``fallback``), or nothing (``none``).
The proxy applies the result like a reload: calls in flight finish on the old table, none fails.
"""

from __future__ import annotations

import dataclasses

from mlmirror.config import Config, Route
from mlmirror.errors import MlmirrorError

__all__ = ["PromotionError", "UnknownNameError", "promoted_config"]


class PromotionError(MlmirrorError):
    """A promotion that cannot be done as asked (a control shadow, or one not promotable)."""


class UnknownNameError(PromotionError):
    """The route or the shadow named does not exist."""

    unknown_name = True  # the admin endpoint answers 404, not 409


def promoted_config(config: Config, route_name: str, shadow_name: str) -> Config:
    """``config`` with ``shadow_name`` promoted to primary of ``route_name``."""
    route = next((r for r in config.routes if r.name == route_name), None)
    if route is None:
        known = ", ".join(r.name for r in config.routes)
        raise UnknownNameError(f"no route {route_name!r} (routes: {known})")
    shadow = route.shadow(shadow_name)
    if shadow is None:
        known = ", ".join(s.name for s in route.shadows) or "none"
        raise UnknownNameError(f"route {route_name!r} has no shadow {shadow_name!r} (its shadows: {known})")
    if shadow.control:
        raise PromotionError(f"shadow {shadow_name!r} is the control of route {route_name!r}: it is never promoted")
    old = route.primary
    shadows = tuple(s for s in route.shadows if s.name != shadow_name)
    fallback = tuple(name for name in route.fallback if name != shadow.upstream)
    demote = route.promotion.demote_to
    if demote == "shadow" and not any(s.upstream == old for s in shadows):
        shadows = (dataclasses.replace(shadow, name=_free_name(old, shadows), upstream=old), *shadows)
    elif demote == "fallback" and old not in fallback:
        fallback = (old, *fallback)
    promoted: Route = dataclasses.replace(route, primary=shadow.upstream, fallback=fallback, shadows=shadows)
    routes = tuple(promoted if r.name == route_name else r for r in config.routes)
    return dataclasses.replace(config, routes=routes)


def _free_name(wanted: str, shadows: tuple) -> str:
    names = {s.name for s in shadows}
    name, n = wanted, 1
    while name in names:
        n += 1
        name = f"{wanted}-{n}"
    return name

"""Which client metadata leaves with a copy: credentials never do, unless a shadow asks for one by name.

Production gets every header the client sent (minus hop-by-hop ones). A shadow is often less trusted than
production (a vendor's model, a notebook build), so its copies go without ``CREDENTIAL_METADATA``
(``authorization``, ``cookie``, ``proxy-authorization``, ``x-api-key``) and without the shadow's
``strip_metadata``; its ``forward_metadata`` allows one of those back (``Shadow.stripped_metadata``).

The same rule holds before a call leaves the serving process: a worker hands the observing process only the
metadata some shadow of the route would carry (``HandoffFilter``). Captures never store metadata at all
(proxy/observing/capture/record.py).

Dropping a header that copies used to carry is a changed default, so the first time a header is dropped the log
says so once (per shadow, or per route for the hand-off), naming ``forward_metadata``; the values are never logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from mlmirror.config import Route, Shadow
from mlmirror.handoff.tap import CallRecord, Observer

__all__ = ["HandoffFilter", "ShadowHeaders", "handoff_stripped", "without"]

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]


def without(metadata: Metadata, stripped: frozenset[str]) -> Metadata:
    """``metadata`` minus the entries whose key is in ``stripped``; the very tuple when there is none."""
    for key, _ in metadata:
        if key in stripped:
            return tuple(item for item in metadata if item[0] not in stripped)
    return metadata


def handoff_stripped(route: Route) -> frozenset[str]:
    """Metadata no shadow of ``route`` carries: what a worker need not hand over (every credential when the route
    has no shadow)."""
    stripped = [shadow.stripped_metadata for shadow in route.shadows]
    return frozenset.intersection(*stripped) if stripped else Shadow(name="", upstream="").stripped_metadata


def _warn_once(dropped: Iterable[str], who: str) -> None:
    log.warning(
        "%s: copies go without %s (credentials are dropped from shadow copies by default; a shadow's "
        "forward_metadata sends one again); logged once", who, ", ".join(sorted(set(dropped))),
    )  # fmt: skip


class ShadowHeaders:
    """The metadata of one shadow's copies: ``record.metadata`` minus what the shadow drops, warned about once."""

    __slots__ = ("_stripped", "_warned", "_who")

    def __init__(self, route: str, shadow: Shadow) -> None:
        self._stripped = shadow.stripped_metadata
        self._who = f"shadow {shadow.name} of route {route}"
        self._warned = False

    def __call__(self, metadata: Metadata) -> Metadata:
        kept = without(metadata, self._stripped)
        if kept is not metadata and not self._warned:
            self._warned = True
            _warn_once((key for key, _ in metadata if key in self._stripped), self._who)
        return kept


class HandoffFilter:
    """A worker's observer for one route: hands ``inner`` (the hand-off sender) each record with only the metadata
    some shadow of the route carries. Constant work when no header is dropped (the record itself is passed on)."""

    __slots__ = ("_inner", "_stripped", "_warned", "_who", "name")

    def __init__(self, inner: Observer, route: Route) -> None:
        self._inner = inner
        self.name = inner.name
        self._stripped = handoff_stripped(route)
        self._who = f"route {route.name} (shadows {', '.join(s.name for s in route.shadows) or 'none'})"
        self._warned = not route.shadows  # nothing was ever sent on without shadows: no default changed

    def offer(self, record: CallRecord) -> None:
        kept = without(record.metadata, self._stripped)
        if kept is not record.metadata:
            if not self._warned:
                self._warned = True
                _warn_once((key for key, _ in record.metadata if key in self._stripped), self._who)
            record = dataclasses.replace(record, metadata=kept)
        self._inner.offer(record)

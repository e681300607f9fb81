"""Capture of a route's calls as a per-route part (proxy/observing/parts.py): config ``routes[].capture``.

The factory creates the capture directory (one that cannot be created refuses the start, or the reload). A reload
keeps the writer while its settings and the route's redaction are unchanged. A replaced writer is closed and
finishes what it had queued in its own thread; a new writer for the same route or the same directory waits for it
before writing. Figures (records, bytes, files) are kept per route across writers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from mlmirror.config import Route
from mlmirror.errors import StartError
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.capture.writer import CaptureCollector, CaptureStats, CaptureWriter
from mlmirror.observing.parts import PartContext, PartKind, RoutePart

__all__ = ["KIND", "CapturePart", "CaptureShelf"]


class CaptureShelf:
    """The capture state of the process: figures per route, and closed writers whose thread may still be writing."""

    def __init__(self) -> None:
        self.stats: dict[str, CaptureStats] = {}
        self.retired: list[CaptureWriter] = []

    def retire(self, writer: CaptureWriter) -> None:
        writer.close()
        self.retired = [w for w in (*self.retired, writer) if w.alive]

    async def stop(self) -> None:
        for writer in self.retired:
            await asyncio.to_thread(writer.stop)  # writes what is queued, flushes, closes


class CapturePart(RoutePart):
    """A route's capture writer (``writer``; made when the part starts, after the writers it replaces closed)."""

    def __init__(self, route: Route, context: PartContext) -> None:
        assert route.capture is not None
        try:
            Path(route.capture.path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartError(
                f"route {route.name}: cannot create capture directory {route.capture.path}: {exc.strerror or exc}"
            ) from None
        self.route = route.name
        self.spec = route.capture
        self.redact = route.redact
        self.name = f"capture:{route.name}"
        self._shelf = context.shelf("capture", CaptureShelf)
        stats = self._shelf.stats.setdefault(route.name, CaptureStats())
        self.writer = CaptureWriter(route.name, self.spec, self.redact, stats)

    def offer(self, record: CallRecord) -> None:
        self.writer.offer(record)

    def status(self) -> object:
        return self.writer.snapshot()

    def reloaded(self, route: Route, context: PartContext) -> RoutePart:
        if (route.capture, route.redact) == (self.spec, self.redact):
            return self
        return CapturePart(route, context)

    def start(self) -> None:
        after = [w for w in self._shelf.retired if w.route == self.route or w.spec.path == self.spec.path]
        self.writer = CaptureWriter(self.route, self.spec, self.redact, self.writer.stats, after)
        self.writer.start()

    def close(self, successor: RoutePart | None) -> None:
        self._shelf.retire(self.writer)

    async def stop(self) -> None:
        await asyncio.to_thread(self.writer.stop)  # writes what is queued, flushes, closes


KIND = PartKind(
    key="capture",
    configured=lambda route: route.capture is not None,
    build=CapturePart,
    collector=lambda parts: CaptureCollector(lambda: [part.writer for part in parts()]),
)

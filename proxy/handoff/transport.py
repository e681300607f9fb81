"""The hand-off between worker processes and the hub (``mlmirror serve --workers N``): answered calls, sampled,
batched, over a Unix socket.

Each watched route of a worker feeds its tap's ``RouteDoor`` (``HandoffSender.door``), which keeps only the calls
some consumer in the hub will take: the sampling decision is ``sampled(request_id, percent)`` with the largest
``percent`` of the route's shadows, drift and capture, the same pure function each consumer applies again, so a
call none of them wants never crosses. ``HandoffSender.offer`` never blocks and never raises: records are gathered
for ``linger`` seconds (10 ms) or until ``max_batch`` (64) have come, then encoded as one frame
(proxy/handoff/frames.py) and written without waiting for the hub to read them. A write is a system call and wakes
the observing process, so one per batch of a busy worker's calls, not one per event-loop iteration, is what keeps
the serving side's cost per call low (docs/BENCHMARKS.md); the calls reach the hub at most ``linger`` later, which no
consumer there notices. When the socket's send buffer already holds ``high_water`` bytes (the hub is behind), the
batch is dropped and counted (``backpressure``), as is every record offered while the hub is not connected
(``disconnected``), and a record the format cannot carry (``unserializable``). So a slow or dead hub costs a worker
a counter, never a call.

The receiver trusts nothing it reads: a damaged batch frame is counted in ``malformed`` (by worker), the records
before the damage are delivered, and reading goes on with the next frame; only a length prefix beyond
``MAX_FRAME`` (the stream is out of step) closes the connection. The socket lives in a directory only this user
can open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from mlmirror.config import Route
from mlmirror.handoff import frames
from mlmirror.handoff.frames import FrameError
from mlmirror.handoff.tap import CallRecord
from mlmirror.serving.sampling import sampled
from prometheus_client import Counter

__all__ = ["HandoffReceiver", "HandoffSender", "RouteDoor", "handoff_percent"]

log = logging.getLogger(__name__)


def handoff_percent(route: Route) -> float:
    """The share of ``route``'s calls (0-100) some consumer in the hub takes: the largest percent of its shadows,
    drift and capture (each samples by the same request-id hash, so their calls are a subset of these)."""
    percents = [shadow.percent for shadow in route.shadows]
    percents += [spec.percent for spec in (route.drift, route.capture) if spec is not None]
    return max(percents, default=0.0)


class RouteDoor:
    """One route's way to the hub: a tap observer that hands over the calls sampled at ``percent``."""

    __slots__ = ("_offer", "percent")

    name = "handoff"

    def __init__(self, sender: HandoffSender, percent: float) -> None:
        self._offer = sender.offer
        self.percent = percent

    def offer(self, record: CallRecord) -> None:
        if self.percent >= 100.0 or sampled(record.request_id, self.percent):
            self._offer(record)


class HandoffSender:
    """A worker's end: ``offer`` (never blocks) gathers records, one frame per ``linger`` seconds (0: per event-loop
    iteration) or per ``max_batch`` records goes to the hub's socket."""

    name = "handoff"

    def __init__(
        self,
        path: str | Path,
        dropped: Counter,
        *,
        max_batch: int = 64,
        linger: float = 0.01,
        high_water: int = 16 * 2**20,
    ) -> None:
        self.path = str(path)
        self._dropped = dropped
        self._max_batch = max_batch
        self._linger = linger
        self._high_water = high_water
        self._batch: list[CallRecord] = []
        self._timer: asyncio.Handle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self.sent = 0
        for reason in ("backpressure", "disconnected", "unserializable"):
            dropped.labels(reason)

    def door(self, route: Route) -> RouteDoor:
        """The tap observer for ``route``: hands over the calls its hub consumers sample (``handoff_percent``)."""
        return RouteDoor(self, handoff_percent(route))

    async def connect(self) -> None:
        """Open the socket to the hub (raises OSError when no hub listens there, or its backlog is full).

        The connect itself is made here, not by the event loop: a Unix-socket connect either completes at once or
        fails at once (EAGAIN when the listener's backlog is full), so there is nothing to wait for, and an event
        loop's own connect path must not be left waiting on a listener that is not there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)

    def hello(self, **facts: object) -> None:
        """Tell the hub who this worker is (index, pid, admin port ...): JSON values."""
        if self._writer is not None:
            self._writer.write(frames.encode_hello(dict(facts)))

    async def hub_gone(self) -> None:
        """Return when the hub closes the connection (it stopped or died)."""
        assert self._reader is not None
        while await self._reader.read(4096):
            pass

    async def keep_connected(self, hello: dict[str, object], retry: tuple[float, float] = (0.05, 1.0)) -> None:
        """Stay connected to the hub for ever (until cancelled): when it goes away (the observing process is
        restarted), connect again every ``retry[0]`` seconds, doubling to ``retry[1]``, and say ``hello`` on each
        connection. Calls offered meanwhile are counted ``disconnected``."""
        delay = retry[0]
        while True:
            if self._writer is None or self._writer.is_closing():
                try:
                    await self.connect()
                except OSError as exc:
                    log.debug("hand-off: cannot connect to %s yet: %r", self.path, exc)
                    self._writer = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, retry[1])
                    continue
                delay = retry[0]
                log.info("hand-off: connected to the observing process")
            self.hello(**hello)
            try:
                await self.hub_gone()
            except OSError:
                pass
            except Exception:
                log.exception("hand-off: reading from the observing process failed")
            log.warning("hand-off: the observing process went away; connecting again")
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.close()

    def offer(self, record: CallRecord) -> None:
        batch = self._batch
        batch.append(record)
        if len(batch) >= self._max_batch:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._linger, self.flush) if self._linger > 0 else loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the gathered records as one frame, or drop and count them."""
        if self._timer is not None:
            self._timer.cancel()  # harmless when it is the timer calling
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        writer = self._writer
        if writer is None or writer.is_closing():
            self._dropped.labels("disconnected").inc(len(batch))
        elif writer.transport.get_write_buffer_size() > self._high_water:
            self._dropped.labels("backpressure").inc(len(batch))
        else:
            frame, count, skipped = frames.encode_batch(batch)
            if skipped:  # a value the format cannot carry: a bug, never the call's problem
                self._dropped.labels("unserializable").inc(skipped)
                log.error("hand-off: %d of %d calls could not be encoded; dropped", skipped, len(batch))
            if count:
                writer.write(frame)
                self.sent += count

    async def close(self) -> None:
        """Send what is gathered, then close, waiting at most a second for the bytes to leave."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


class HandoffReceiver:
    """The hub's end: a Unix socket server; each worker's records go to ``deliver``, its hello to ``greeted``.
    ``received`` counts records by worker; ``malformed`` (optional) counts damaged frames by worker."""

    def __init__(
        self,
        path: str | Path,
        deliver: Callable[[CallRecord], None],
        greeted: Callable[[dict], None],
        received: Counter,
        malformed: Counter | None = None,
        before_read: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_read``: awaited before each frame is read (the observing process's wait while serving is
        busy); ``greeted`` gets each worker's hello."""
        self.path = str(path)
        self._before_read = before_read
        self._deliver = deliver
        self._greeted = greeted
        self._received = received
        self._malformed = malformed
        self.malformed = 0  # damaged frames, all workers
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _damaged(self, worker: str, exc: FrameError) -> None:
        self.malformed += 1
        if self._malformed is not None:
            self._malformed.labels(worker).inc()
        if self.malformed == 1 or self.malformed % 1000 == 0:
            log.error("hand-off from worker %s: a damaged frame (%s; %d so far)", worker, exc, self.malformed)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        worker = "?"
        try:
            while True:
                if self._before_read is not None:
                    await self._before_read()
                length = int.from_bytes(await reader.readexactly(4), "big")
                if length == 0 or length > frames.MAX_FRAME:
                    self._damaged(worker, FrameError(f"a {length}-byte frame", [], 1))
                    return  # out of step: nothing after this can be trusted
                frame = await reader.readexactly(length)
                kind, payload = frame[:1], memoryview(frame)[1:]
                if kind == frames.BATCH:
                    try:
                        records = frames.decode_batch(payload)
                    except FrameError as exc:
                        records = exc.records
                        self._damaged(worker, exc)
                    self._received.labels(worker).inc(len(records))
                    for record in records:
                        self._deliver(record)
                elif kind == frames.HELLO:
                    try:
                        hello = frames.decode_hello(payload)
                    except FrameError as exc:
                        self._damaged(worker, exc)
                        continue
                    worker = str(hello.get("index", "?"))
                    self._greeted(hello)
                else:
                    self._damaged(worker, FrameError(f"a frame of unknown kind {kind!r}", [], 1))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker stopped (or sent half a frame and closed)
        except Exception:  # a bug here must cost one connection, never the hub
            log.exception("hand-off from worker %s: closing the connection", worker)
        finally:
            self._connections.discard(writer)
            writer.close()

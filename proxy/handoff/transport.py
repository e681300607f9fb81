"""The hand-off between worker processes and the hub (``mlmirror serve --workers N``): answered calls, batched, over
a Unix socket.

A worker's tap offers each answered call of a watched route (one with shadows, drift or capture) to its
``HandoffSender``, which never blocks: records gathered during one event-loop iteration are written as one frame
in the next, without waiting for the hub to read them. When the socket's send buffer already holds
``high_water`` bytes (the hub is behind), the batch is dropped and counted (``backpressure``), as is every record
offered while the hub is not connected (``disconnected``) and, beyond ``max_batch`` records in one iteration,
``queue_full``. So a slow or dead hub costs a worker a counter, never a call.

Frames: a 4-byte big-endian length, then ``marshal`` data: a dict (the worker's hello: index, pid, ports) or a
list of record tuples (``pack``). The socket lives in a directory only this user can open: the hub trusts what its
own workers send, and no one else can connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from mlmirror.handoff.tap import CallRecord
from prometheus_client import Counter

__all__ = ["HandoffReceiver", "HandoffSender", "pack", "unpack"]

log = logging.getLogger(__name__)

MAX_FRAME = 256 * 2**20  # bytes; a larger length prefix means a broken stream
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def pack(record: CallRecord) -> tuple:
    """A record as plain values ``marshal`` can write. (gRPC gives metadata entries as named tuples, which marshal
    refuses: they become plain pairs.)"""
    metadata = tuple((str(key), value if isinstance(value, bytes) else str(value)) for key, value in record.metadata)
    return (
        record.route, record.method, bytes(record.request), None if record.response is None else bytes(record.response),
        record.code.value[0], record.served_by, record.role, record.request_id, metadata, record.started,
        record.latency, record.upstream_latency,
    )  # fmt: skip


def unpack(fields: tuple) -> CallRecord:
    """The record ``pack`` gave ``fields`` for."""
    route, method, request, response, code, served_by, role, request_id, metadata, started, latency, upstream = fields
    return CallRecord(
        route=route, method=method, request=request, response=response, code=_CODES[code], served_by=served_by,
        role=role, request_id=request_id, metadata=metadata, started=started, latency=latency,
        upstream_latency=upstream,
    )  # fmt: skip


def _frame(value: Any) -> bytes:
    """``value`` (plain values ``marshal`` writes) behind its length in 4 bytes, big-endian."""
    payload = marshal.dumps(value)
    return len(payload).to_bytes(4, "big") + payload


class HandoffSender:
    """A worker's end: an observer for the tap (``offer`` never blocks) writing batches to the hub's socket."""

    name = "handoff"

    def __init__(self, path: str | Path, dropped: Counter, *, max_batch: int = 10_000, high_water: int = 16 * 2**20):
        self.path = str(path)
        self._dropped = dropped
        self._max_batch = max_batch
        self._high_water = high_water
        self._batch: list[tuple] = []
        self._scheduled = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self.sent = 0
        for reason in ("queue_full", "backpressure", "disconnected", "unserializable"):
            dropped.labels(reason)

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
        """Tell the hub who this worker is (index, pid, admin port ...)."""
        if self._writer is not None:
            self._writer.write(_frame(dict(facts)))

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
        if len(self._batch) >= self._max_batch:
            self._dropped.labels("queue_full").inc()
            return
        self._batch.append(pack(record))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the gathered records as one frame, or drop and count them."""
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        writer = self._writer
        if writer is None or writer.is_closing():
            self._dropped.labels("disconnected").inc(len(batch))
        elif writer.transport.get_write_buffer_size() > self._high_water:
            self._dropped.labels("backpressure").inc(len(batch))
        else:
            try:
                frame = _frame(batch)
            except (ValueError, TypeError) as exc:  # a value marshal cannot write: a bug, never the call's problem
                self._dropped.labels("unserializable").inc(len(batch))
                log.error("hand-off: cannot serialize a batch of %d calls (%s); dropped", len(batch), exc)
                return
            writer.write(frame)
            self.sent += len(batch)

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
    """The hub's end: a Unix socket server; each worker's records go to ``deliver``, its hello to ``greeted``."""

    def __init__(
        self,
        path: str | Path,
        deliver: Callable[[CallRecord], None],
        greeted: Callable[[dict], None],
        received: Counter,
    ) -> None:
        self.path = str(path)
        self._deliver = deliver
        self._greeted = greeted
        self._received = received
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        worker = "?"
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(4), "big")
                if length > MAX_FRAME:
                    log.error("hand-off from worker %s: a %d-byte frame; closing the connection", worker, length)
                    return
                value = marshal.loads(await reader.readexactly(length))
                if isinstance(value, dict):
                    worker = str(value.get("index", "?"))
                    self._greeted(value)
                    continue
                self._received.labels(worker).inc(len(value))
                for fields in value:
                    self._deliver(unpack(fields))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker stopped
        except (ValueError, EOFError, TypeError) as exc:
            log.error("hand-off from worker %s: unreadable frame (%s); closing the connection", worker, exc)
        finally:
            self._connections.discard(writer)
            writer.close()

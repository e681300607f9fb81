"""Shadow copies as messages of one ``ModelStreamInfer`` stream (Triton's streaming extension), not one call each.

With ``transport: stream`` a shadow's ModelInfer copies go over one long-lived bidirectional stream: each copy is
the client's request with its ``id`` set to a tag of ours (the serialized request plus one appended ``id`` field,
which protobuf reads as the last value; no re-encoding), and each answer is matched to its copy by the ``id`` the
server echoes in ``infer_response``. A message on an open stream costs the observing process less CPU than a unary
call (measured in docs/BENCHMARKS.md); what it gives up:

- the client's per-call metadata: the stream carries only ``x-mlmirror-shadow`` (it is opened once);
- a copy's own deadline on the server: ``timeout`` is kept here; a copy unanswered in time is counted
  ``DEADLINE_EXCEEDED`` and its answer, if it comes later, ignored;
- isolation: when the stream ends (the shadow restarts, a network error), every copy waiting on it finishes as
  ``UNAVAILABLE`` and the next copy opens a new stream.

An answer whose ``error_message`` is set finishes its copy as ``UNKNOWN`` (Triton reports model errors this way).
At most ``max_inflight`` copies wait on the stream (the mirror's own bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque

import grpc
from mlmirror.protocol.names import MODEL_STREAM_INFER
from mlmirror.protocol.wire import encode_string_field, read_bytes_field, read_string_field
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["StreamCopies", "tag_request", "untag_answer"]

log = logging.getLogger(__name__)

_ID_FIELD = 3  # ModelInferRequest.id and ModelInferResponse.id
_ERROR_FIELD = 1  # ModelStreamInferResponse.error_message
_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response


def tag_request(request: bytes, tag: str) -> bytes:
    """``request`` (a serialized ModelInferRequest) with its ``id`` set to ``tag`` (the last value is the one read)."""
    return request + encode_string_field(_ID_FIELD, tag)


def untag_answer(message: bytes) -> tuple[str | None, bytes | None, str]:
    """(the copy's tag, its serialized ModelInferResponse or None, the error message or "") of one serialized
    ModelStreamInferResponse. Raises ValueError when it is not one (no ``infer_response``, or malformed)."""
    response = read_bytes_field(message, _RESPONSE_FIELD)
    if response is None:
        raise ValueError("no infer_response")
    error = read_string_field(message, _ERROR_FIELD) or ""
    return read_string_field(response, _ID_FIELD), (None if error else response), error


class StreamCopies:
    """One shadow's ModelInfer copies over one ``ModelStreamInfer`` stream, reopened when it ends.

    One writer task writes the copies in the order they come (grpc.aio takes one write at a time); one reader task
    hands each answer to its copy; one timer expires the copies waiting longest (copies of one shadow share its
    ``timeout``, so they expire in the order they were sent)."""

    def __init__(self, target: UpstreamTarget, shadow: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.target = target
        self.shadow = shadow
        self._metadata = metadata
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: deque[tuple[str, bytes]] = deque()
        #: tag -> (the copy's answer to come, its deadline on the loop's clock), in the order sent
        self._waiting: dict[str, tuple[asyncio.Future[tuple[bytes | None, grpc.StatusCode]], float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tags = itertools.count()
        #: streams opened (the first, and one after each end)
        self.opened = 0

    async def send(self, request: bytes, within: float) -> tuple[bytes | None, grpc.StatusCode]:
        """Send one copy and wait at most ``within`` seconds for its answer: (answer bytes or None, its code)."""
        loop = asyncio.get_running_loop()
        tag = f"mlmirror-{next(self._tags)}"
        answer: asyncio.Future[tuple[bytes | None, grpc.StatusCode]] = loop.create_future()
        self._waiting[tag] = (answer, loop.time() + within)
        self._outbox.append((tag, tag_request(request, tag)))
        if self._writer is None:
            self._writer = loop.create_task(self._write())
        if self._timer is None:
            self._arm(loop)
        try:
            return await answer
        finally:
            self._waiting.pop(tag, None)

    async def _write(self) -> None:
        """Write what is in the outbox (skipping copies already finished), then end."""
        try:
            while self._outbox:
                tag, message = self._outbox.popleft()
                if tag not in self._waiting:
                    continue
                call = self._open()
                try:
                    await call.write(message)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    self._ended(call)  # the stream is gone: the copies waiting on it finish UNAVAILABLE
        finally:
            self._writer = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set the timer for the copy waiting longest."""
        for _, deadline in self._waiting.values():
            self._timer = loop.call_at(deadline, self._expire)
            return

    def _expire(self) -> None:
        """Finish the copies past their deadline as DEADLINE_EXCEEDED (an answer after it is ignored)."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for tag, (answer, deadline) in list(self._waiting.items()):
            if deadline > now:
                break
            del self._waiting[tag]
            if not answer.done():
                answer.set_result((None, grpc.StatusCode.DEADLINE_EXCEEDED))
        self._arm(loop)

    def _open(self) -> grpc.aio.StreamStreamCall:
        call = self._call
        if call is None or call.done():
            stub = self.target.stub("stream_stream", MODEL_STREAM_INFER)
            call = self._call = stub(metadata=self._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
            self.opened += 1
        return call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        """Hand each answer to the copy waiting for it, until the stream ends."""
        try:
            while True:
                message = await call.read()
                if not isinstance(message, bytes):  # grpc.aio.EOF: the server ended the stream
                    break
                try:
                    tag, answer, error = untag_answer(message)
                except ValueError:
                    log.warning("shadow %s: a stream answer that is not a ModelStreamInferResponse", self.shadow)
                    continue
                waiting = self._waiting.pop(tag, None) if tag is not None else None
                if waiting is not None and not waiting[0].done():
                    waiting[0].set_result((answer, grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.OK))
        except grpc.aio.AioRpcError as exc:
            log.debug("shadow %s: stream ended: %s", self.shadow, exc.code().name)
        finally:
            self._ended(call)

    def _ended(self, call: grpc.aio.StreamStreamCall | None) -> None:
        """The stream ``call`` is over: every copy waiting (sent on it, or queued to be) finishes UNAVAILABLE."""
        if call is None or call is not self._call:
            return
        self._call = None
        call.cancel()
        waiting, self._waiting = self._waiting, {}
        for answer, _ in waiting.values():
            if not answer.done():
                answer.set_result((None, grpc.StatusCode.UNAVAILABLE))

    async def close(self) -> None:
        """End the stream and its tasks."""
        call, reader, writer = self._call, self._reader, self._writer
        self._ended(call)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (reader, writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

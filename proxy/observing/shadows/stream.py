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
    """One shadow's ModelInfer copies over one ``ModelStreamInfer`` stream, reopened when it ends."""

    def __init__(self, target: UpstreamTarget, shadow: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.target = target
        self.shadow = shadow
        self._metadata = metadata
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[tuple[bytes | None, grpc.StatusCode]]] = {}
        self._tags = itertools.count()
        self._write_lock = asyncio.Lock()
        #: streams opened (the first, and one after each end)
        self.opened = 0

    async def send(self, request: bytes, within: float) -> tuple[bytes | None, grpc.StatusCode]:
        """Send one copy and wait at most ``within`` seconds for its answer: (answer bytes or None, its code)."""
        tag = f"mlmirror-{next(self._tags)}"
        answer: asyncio.Future[tuple[bytes | None, grpc.StatusCode]] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = answer
        call = self._open()
        try:
            async with asyncio.timeout(within):
                async with self._write_lock:  # one write at a time on a grpc.aio stream
                    await call.write(tag_request(request, tag))
                return await answer
        except TimeoutError:
            return None, grpc.StatusCode.DEADLINE_EXCEEDED
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self._ended(call)  # the stream is gone: this copy and those waiting with it
            return None, grpc.StatusCode.UNAVAILABLE
        finally:
            self._waiting.pop(tag, None)

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
                waiting = self._waiting.get(tag) if tag is not None else None
                if waiting is not None and not waiting.done():
                    waiting.set_result((answer, grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.OK))
        except grpc.aio.AioRpcError as exc:
            log.debug("shadow %s: stream ended: %s", self.shadow, exc.code().name)
        finally:
            self._ended(call)

    def _ended(self, call: grpc.aio.StreamStreamCall | None) -> None:
        """The stream ``call`` is over: every copy still waiting on it finishes UNAVAILABLE."""
        if call is None or call is not self._call:
            return
        self._call = None
        call.cancel()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result((None, grpc.StatusCode.UNAVAILABLE))

    async def close(self) -> None:
        """End the stream and its reader."""
        call, reader = self._call, self._reader
        self._ended(call)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

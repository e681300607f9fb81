"""Observer mode reading Envoy's tap filter: the calls Envoy carries, in batches, from beside Envoy.

envoy/dataplane-tap.yaml gives Envoy an HTTP tap filter under admin control. ``EnvoyTapReader`` attaches to Envoy's
admin (``POST /tap``, HTTP/1.1) with a tap config whose sink is ``buffered_admin``: Envoy keeps the next ``batch``
matching calls as whole traces (request headers, body, trailers; response headers, body, trailers; the times it
received each side's headers), and when the batch is full or ``flush`` has passed, writes them in one response
(binary ``TraceWrapper`` messages, each after its varint length) and ends it. The reader then attaches again, on a
new connection.

Why batches rather than ext_proc's stream per call: the observer reads one response per batch instead of one gRPC
stream per call, so its cost per call is that of parsing a protobuf message (docs/BENCHMARKS.md). Why bounded:
Envoy keeps at most ``batch`` traces of at most ``max_message_size`` bytes per direction, then taps nothing until
the reader attaches again, so a slow, hung or dead observer costs Envoy no more memory and no call waits for it.
What a batch boundary loses: Envoy binds each call to the attachment it started under, so a call still in flight
when Envoy sends the batch is dropped (Envoy's ``http.<prefix>.tap.rq_tapped`` counts it all the same), and a call
that starts before the reader attaches again (about a millisecond) is not tapped: about the calls in flight per
``batch`` calls (docs/BENCHMARKS.md).

(Envoy's ``streaming_admin`` sink is not used: it accepts only JSON output, holds no bound, and Envoy 1.40 stops
on an assertion when it is asked for binary output.)

Each trace becomes a ``CallAssembler`` (proxy/observing/extproc.py) and goes through the same ``offer_call`` as an
ext_proc stream; its outcome is counted in ``mlmirror_envoy_tap_traces_total``: ``observed``, ``too_large`` (a
body Envoy cut at the size limit), ``malformed`` (not a trace, a broken gRPC frame, no ``:path``), ``streaming``,
``compressed``, ``incomplete``, ``unrouted``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

from envoy.data.tap.v3 import wrapper_pb2
from google.protobuf.message import DecodeError
from mlmirror.config.schema_process import EnvoyTap
from mlmirror.observing.adminhttp import body_chunks, response_head, whole_body
from mlmirror.observing.extproc import CallAssembler, StreamOutcomes, TableSource, offer_call

__all__ = ["EnvoyTapReader", "TapRefusedError", "TraceStream", "assemble_trace", "tap_request"]

log = logging.getLogger(__name__)

_FRAME = 5  # a gRPC message's prefix: flag byte and 4-byte length
_RETRY_FIRST, _RETRY_MOST = 0.1, 5.0  # seconds between attempts to attach, doubling
_HEAD_LIMIT = 64 * 1024  # bytes of an admin response's status line and headers
_YIELD_EVERY = 64  # calls observed between two turns of the event loop
_READ_BUFFER = 1 << 20  # bytes the connection may hold unread before it stops reading
_LATE = 10.0  # seconds: an attachment not answered, or a batch not ended ``flush`` + this after it began, is given
#               up (Envoy is hung, or the connection is gone without a word)


class TapRefusedError(Exception):
    """Envoy's admin answered ``POST /tap`` with an error (its text says why: another tap attached, an unknown
    config id)."""


#: what ends an attachment: no connection, a broken one, an answer that is not a tap's, a refusal
_PROBLEMS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TapRefusedError)


def tap_request(settings: EnvoyTap, max_message_size: int) -> bytes:
    """The ``POST /tap`` body (JSON, which Envoy reads as YAML): tap ``settings.method`` at the runtime share, whole
    bodies up to ``max_message_size``, into a buffered sink of ``settings.batch`` traces."""
    body_limit = max_message_size + _FRAME
    config = {
        "config_id": settings.config_id,
        "tap_config": {
            "match": {"http_request_headers_match": {"headers": [
                {"name": ":path", "string_match": {"exact": settings.method}},
            ]}},
            "tap_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                            "runtime_key": settings.runtime_key},
            "output_config": {
                "max_buffered_rx_bytes": body_limit,
                "max_buffered_tx_bytes": body_limit,
                "sinks": [{"format": "PROTO_BINARY_LENGTH_DELIMITED",
                           "buffered_admin": {"max_traces": settings.batch, "timeout": f"{settings.flush:.3f}s"}}],
            },
        },
    }  # fmt: skip
    return json.dumps(config).encode()


class TraceStream:
    """Splits a byte stream of varint-length-delimited messages. A length over ``limit`` bytes raises
    ``ValueError`` (the stream is not what it should be)."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while start < len(buffer):
                length, shift, at = 0, 0, start
                while True:
                    if at >= len(buffer):
                        return  # the length itself is not all here yet
                    byte = buffer[at]
                    at += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 63:
                        raise ValueError("a message length longer than 64 bits")
                if length > self.limit:
                    raise ValueError(f"a message of {length} bytes (at most {self.limit})")
                if at + length > len(buffer):
                    return
                yield bytes(buffer[at : at + length])
                start = at + length
        finally:
            del buffer[:start]

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished message are waiting."""
        return bool(self._buffer)


def assemble_trace(trace: wrapper_pb2.TraceWrapper, max_message_size: int) -> CallAssembler:
    """One call from an ``HttpBufferedTrace``, as an ext_proc stream would have given it."""
    call = CallAssembler(max_message_size)
    http = trace.http_buffered_trace
    request, response = http.request, http.response
    call.read_request_headers(request.headers)
    for frames, body in ((call.request, request.body), (call.response, response.body)):
        if body.truncated:
            frames.problem = "too_large"  # Envoy cut it at max_buffered_*_bytes: max_message_size and a frame
        else:
            frames.feed(body.as_bytes)
    call.read_response_headers(response.headers)
    call.read_status(response.trailers)
    if request.HasField("headers_received_time") and response.HasField("headers_received_time"):
        started = request.headers_received_time.ToNanoseconds() / 1e9
        answered = response.headers_received_time.ToNanoseconds() / 1e9
        call.timed(started, max(0.0, answered - started))
    return call


class EnvoyTapReader:
    """Attaches to Envoy's ``/tap`` admin again and again, and offers every call of every batch to its route."""

    def __init__(
        self, source: TableSource, settings: EnvoyTap, max_message_size: int, traces: StreamOutcomes,
        sessions: StreamOutcomes,
    ) -> None:  # fmt: skip
        """``traces``: counts each trace's outcome; ``sessions``: each attachment's (``flushed``: a batch arrived
        whole; ``refused``: Envoy said no; ``failed``: no connection, or it broke)."""
        self._source = source
        self.admin = settings.admin
        self._deadline = settings.flush + _LATE
        self._limit = max_message_size
        self._body = tap_request(settings, max_message_size)
        self._traces = traces
        self._sessions = sessions
        self.attached = False
        #: why the last attempt failed, for /status and the log ("" while attached)
        self.problem = ""
        host, _, port = settings.admin.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)

    async def run(self) -> None:
        """Read batches until cancelled; never raises. Each batch is observed once the next attachment is made,
        so that Envoy taps again while the observer works through it."""
        wait = _RETRY_FIRST
        batch: list[bytes] = []
        while True:
            try:
                async with asyncio.timeout(_LATE):  # Envoy answers at once unless it is hung
                    reader, writer, headers = await self._attach()
            except _PROBLEMS as exc:
                await self._observe_all(batch)
                batch = []
                self._failed(exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RETRY_MOST)
                continue
            await self._observe_all(batch)
            batch = []
            try:
                async with asyncio.timeout(self._deadline):  # Envoy sends a batch by ``flush``, whatever comes
                    await self._read_batch(reader, headers, batch)
            except _PROBLEMS as exc:
                self._failed(exc)  # what arrived whole is observed all the same
                broken = True
            else:
                broken = False
            finally:
                self.attached = False
                writer.close()
            if broken:
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RETRY_MOST)
                continue
            self._sessions.labels("flushed").inc()
            if self.problem:
                log.info("reading Envoy's tap at %s again", self.admin)
                self.problem = ""
            wait = _RETRY_FIRST

    def _failed(self, exc: BaseException) -> None:
        self.attached = False
        self._sessions.labels("refused" if isinstance(exc, TapRefusedError) else "failed").inc()
        problem = str(exc) if isinstance(exc, TapRefusedError) else f"{type(exc).__name__}: {exc}"
        if problem != self.problem:
            log.warning("cannot read Envoy's tap at %s (retrying): %s", self.admin, problem)
        self.problem = problem

    async def _attach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]]:
        """Connect, POST the tap config, read the answer's head: Envoy taps from now on."""
        reader, writer = await asyncio.open_connection(self._host, self._port, limit=_READ_BUFFER)
        try:
            writer.write(
                b"POST /tap HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (self.admin.encode(), len(self._body))
                + self._body
            )
            await writer.drain()
            status, headers = await response_head(reader)
            if status != 200:
                text = await whole_body(reader, headers, _HEAD_LIMIT)
                raise TapRefusedError(f"Envoy answered {status}: {text.decode('utf-8', 'replace').strip()[:300]}")
        except BaseException:
            writer.close()
            raise
        self.attached = True
        return reader, writer, headers

    async def _read_batch(self, reader: asyncio.StreamReader, headers: dict[str, str], batch: list[bytes]) -> None:
        """The traces of one response, appended to ``batch`` as they arrive whole, to the end of the response."""
        stream = TraceStream(2 * (self._limit + _FRAME) + _HEAD_LIMIT)
        async for data in body_chunks(reader, headers):
            batch.extend(stream.feed(data))
        if stream.partial:
            raise EOFError("the batch ended inside a trace")

    async def _observe_all(self, batch: list[bytes]) -> None:
        """Observe a batch, letting the event loop run between every ``_YIELD_EVERY`` calls (a batch of 2000 takes
        a few hundred ms, and the admin endpoint answers meanwhile)."""
        for i, message in enumerate(batch, 1):
            self._observe(message)
            if i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def _observe(self, message: bytes) -> None:
        try:
            trace = wrapper_pb2.TraceWrapper.FromString(message)
        except DecodeError:
            self._traces.labels("malformed").inc()
            return
        if not trace.HasField("http_buffered_trace"):
            self._traces.labels("malformed").inc()
            return
        call = assemble_trace(trace, self._limit)
        outcome = call.outcome()
        if outcome == "observed":
            outcome = offer_call(self._source, call)
        self._traces.labels(outcome).inc()

"""Observer mode: mlmirror as an Envoy ext_proc server that watches calls Envoy carries, and never answers them.

Envoy forwards the client's calls to the production model itself and, through its ext_proc filter in
``observability_mode`` ("send and go"), streams each HTTP/2 request to mlmirror: request headers, request body
chunks, response headers, response body chunks, response trailers, as ``ProcessingRequest`` messages on one
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` stream per call. Envoy does not wait for an answer, so
nothing here can slow or fail a call; mlmirror sends none.

``CallAssembler`` rebuilds one call from those messages: it reassembles the gRPC length-prefixed messages from the
body chunks, reads the method from ``:path`` and the status from ``grpc-status``, and yields a ``CallRecord`` —
the same record the proxy's own handler gives its tap — for unary calls.

Every message costs the observer a stream read, so envoy/dataplane.yaml sends four per call, not five: it skips
the request headers and asks Envoy for the few facts needed from them as attributes, which Envoy sends with the
first message of each direction (``ATTRIBUTES``): the method (``request.path``), Envoy's request id
(``request.id``) and the client's ``x-mlmirror-request-id`` on the request side, and the cluster that answered
(``xds.cluster_name``) with the response headers. Request headers, when sent, are read as before (the client's
metadata then reaches the records, for shadow copies made here). Who served: the ``xds.cluster_name`` attribute,
else an ``x-mlmirror-served-by`` response header, else ``unknown`` (``SERVED_BY_UNKNOWN``).

``ExtProcObserver`` routes the record with the proxy's route table, counts it in the route's request metrics, and
offers it to the route's tap (drift engine, shadow mirrors). Streams that cannot give a record are counted by reason in
``mlmirror_extproc_streams_total``: ``streaming`` (more than one message on a side), ``compressed`` (a
compressed gRPC message), ``too_large`` (over ``max_message_size``), ``incomplete`` (the stream ended before the
response's status), ``malformed`` (a broken gRPC frame or no ``:path``), ``unrouted``.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from mlmirror.handoff.tap import CallRecord
from mlmirror.protocol.names import ENVOY_REQUEST_ID, HOP_BY_HOP_METADATA, REQUEST_ID, SERVED_BY
from mlmirror.protocol.status import status_of

if TYPE_CHECKING:
    from mlmirror.serving.table import RouteTable

__all__ = [
    "ATTRIBUTES", "SERVED_BY_UNKNOWN", "CallAssembler", "ExtProcObserver", "GrpcFrames",
    "StreamOutcomes", "TableSource", "offer_call",
]  # fmt: skip

SERVED_BY_UNKNOWN = "unknown"  # who served, when Envoy told neither the cluster attribute nor the header
#: What the observer reads from Envoy's attributes: request_attributes and response_attributes in the filter.
ATTRIBUTES = {
    "request": ("request.path", "request.id", f'request.headers["{REQUEST_ID}"]'),
    "response": ("xds.cluster_name",),
}
_FILTER = "envoy.filters.http.ext_proc"  # the key Envoy files attributes under

#: Headers that describe the HTTP/2 hop or are Envoy's own, not the client's gRPC metadata.
_NOT_METADATA = HOP_BY_HOP_METADATA | {"content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}

log = logging.getLogger(__name__)


class GrpcFrames:
    """Reassembles gRPC length-prefixed messages (1 flag byte, 4-byte big-endian length, payload) from body chunks.

    ``problem`` becomes ``compressed``, ``too_large`` or ``malformed`` when a frame cannot be used; from then on
    input is ignored, so a bad stream costs no memory. Messages larger than ``limit`` bytes are refused from their
    header, before their payload is buffered.
    """

    __slots__ = ("_buffer", "limit", "messages", "problem")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[bytes] = []
        self.problem = ""
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        if self.problem:
            return
        buffer = self._buffer
        buffer += chunk
        while len(buffer) >= 5:
            flag = buffer[0]
            length = int.from_bytes(buffer[1:5], "big")
            if flag not in (0, 1):
                self._fail("malformed")
                return
            if flag == 1:
                self._fail("compressed")
                return
            if length > self.limit:
                self._fail("too_large")
                return
            if len(buffer) < 5 + length:
                return
            self.messages.append(bytes(buffer[5 : 5 + length]))
            del buffer[: 5 + length]

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished message are waiting."""
        return bool(self._buffer)

    def _fail(self, reason: str) -> None:
        self.problem = reason
        self._buffer = bytearray()


class StreamOutcomes(Protocol):
    """Where the assembler's verdict on each stream is counted (a prometheus-client counter by outcome)."""

    def labels(self, outcome: str) -> _Count: ...


class _Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class CallAssembler:
    """The state of one ext_proc stream: one HTTP/2 gRPC call as Envoy saw it."""

    __slots__ = (
        "_arrived", "_entered", "_ids", "_latency", "code", "metadata", "method", "request", "response",
        "served_by", "status_seen",
    )  # fmt: skip

    def __init__(self, limit: int) -> None:
        self.method = ""
        self.served_by = ""
        self._ids: tuple[str, str] = ("", "")  # (client's x-mlmirror-request-id, Envoy's), from attributes
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.request = GrpcFrames(limit)
        self.response = GrpcFrames(limit)
        self.code: grpc.StatusCode | None = None
        self.status_seen = False
        self._entered = time.perf_counter()
        self._arrived = time.time()
        self._latency: float | None = None  # None: from the assembler's creation to ``record()``

    def timed(self, started: float, latency: float) -> None:
        """The call started at ``started`` (Unix time, s) and took ``latency`` seconds, as Envoy timed it (a tap
        trace's header times), instead of the times this assembler saw."""
        self._arrived, self._latency = started, latency

    def take(self, message: external_processor_pb2.ProcessingRequest) -> None:
        """Apply one ``ProcessingRequest``."""
        if message.attributes:
            self._attributes(message.attributes)
        part = message.WhichOneof("request")
        if part == "request_headers":
            self.read_request_headers(message.request_headers.headers.headers)
        elif part == "request_body":
            self.request.feed(message.request_body.body)
        elif part == "response_body":
            self.response.feed(message.response_body.body)
        elif part == "response_headers":
            self.read_response_headers(message.response_headers.headers.headers)
        elif part == "response_trailers":
            self.read_status(message.response_trailers.trailers.headers)

    def read_request_headers(self, headers) -> None:
        """The method (``:path``) and the client's metadata, from request headers (``HeaderValue`` entries)."""
        metadata: list[tuple[str, str | bytes]] = []
        envoy_id = ""
        has_id = False
        for key, value in _header_items(headers):
            if key == ":path":
                self.method = value
            elif key.startswith(":") or key in _NOT_METADATA:
                continue
            elif key.endswith("-bin"):
                metadata.append((key, _unbase64(value)))
            else:
                metadata.append((key, value))
                has_id = has_id or key == REQUEST_ID
                if key == ENVOY_REQUEST_ID:
                    envoy_id = value
        if not has_id and envoy_id:  # Envoy's id names the call, in its access logs and on its mirrored copies
            metadata.append((REQUEST_ID, envoy_id))
        self.metadata = tuple(metadata)

    def read_response_headers(self, headers) -> None:
        """The status of a trailers-only answer, and who served (``x-mlmirror-served-by``) unless already known."""
        self.read_status(headers)
        if not self.served_by:
            self.served_by = next((value for key, value in _header_items(headers) if key == SERVED_BY), "")

    def _attributes(self, attributes) -> None:
        """Facts Envoy sent as attributes (``ATTRIBUTES``); a value of another type than text is ignored."""
        facts = attributes.get(_FILTER)
        if facts is None:
            return
        fields = facts.fields
        path = _text(fields, "request.path")
        if path and not self.method:
            self.method = path
        cluster = _text(fields, "xds.cluster_name")
        if cluster:
            self.served_by = cluster
        client, envoy = _text(fields, ATTRIBUTES["request"][2]), _text(fields, "request.id")
        if client or envoy:
            self._ids = (client, envoy)

    def read_status(self, headers) -> None:
        """The call's status, from the ``grpc-status`` of response headers or trailers."""
        for key, value in _header_items(headers):
            if key == "grpc-status":
                self.status_seen = True
                self.code = status_of(value)

    def outcome(self) -> str:
        """``observed`` when ``record`` can be built, else why not."""
        for frames in (self.request, self.response):
            if frames.problem:
                return frames.problem
        if not self.method:
            return "malformed"
        if not self.status_seen or self.request.partial or self.response.partial:
            return "incomplete"
        if len(self.request.messages) != 1 or len(self.response.messages) > 1:
            return "streaming"
        if self.code is grpc.StatusCode.OK and not self.response.messages:
            return "incomplete"
        return "observed"

    def client_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The client's metadata: from the request headers when Envoy sent them, else the request ids Envoy gave as
        attributes (the client's ``x-mlmirror-request-id``, or Envoy's own id)."""
        if self.metadata:
            return self.metadata
        client, envoy = self._ids
        return ((REQUEST_ID, client or envoy),) if client or envoy else ()

    def record(self, route: str, served_by: str, request_id: str, metadata) -> CallRecord:
        """The call as a tap record (call only when ``outcome()`` is ``observed``). Latency is measured from the
        request headers' arrival here to the status's, which is the call's latency as Envoy relayed it, plus
        nothing of mlmirror's."""
        assert self.code is not None
        seconds = time.perf_counter() - self._entered if self._latency is None else self._latency
        ok = self.code is grpc.StatusCode.OK
        return CallRecord(
            route=route,
            method=self.method,
            request=self.request.messages[0],
            response=self.response.messages[0] if ok else None,
            code=self.code,
            served_by=served_by,
            role="primary",
            request_id=request_id,
            metadata=metadata,
            started=self._arrived,
            latency=seconds,
            upstream_latency=seconds,
        )


def _text(fields, key: str) -> str:
    value = fields.get(key)
    return value.string_value if value is not None and value.HasField("string_value") else ""


def _header_items(headers) -> list[tuple[str, str]]:
    """(key, value) pairs of an ext_proc ``HeaderMap``: Envoy sends values in ``raw_value`` (bytes), or in
    ``value`` on older versions."""
    return [(h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in headers]


def _unbase64(value: str) -> bytes:
    """A binary (``-bin``) header's bytes; gRPC sends them base64-encoded, padding optional."""
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return value.encode()


class TableSource(Protocol):
    """Whatever holds the current route table (the proxy); read once per observed call."""

    table: RouteTable


class ExtProcObserver(external_processor_pb2_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor`` in observability mode: reads each stream to its end, sends
    nothing back, and hands every complete unary call to its route's tap."""

    def __init__(self, source: TableSource, outcomes: StreamOutcomes, max_message_size: int) -> None:
        self._source = source
        self._outcomes = outcomes
        self._limit = max_message_size
        self.active = 0

    async def Process(  # noqa: N802 - the gRPC method's name
        self, request_iterator: AsyncIterator[external_processor_pb2.ProcessingRequest], context
    ) -> None:
        call = CallAssembler(self._limit)
        self.active += 1
        try:
            async for message in request_iterator:
                call.take(message)
                if call.status_seen:
                    break  # the call is over; Envoy closes its side when it is done
        except grpc.aio.AioRpcError:
            pass  # Envoy went away mid-call: what arrived is judged below
        finally:
            self.active -= 1
        self._observe(call)

    def _observe(self, call: CallAssembler) -> None:
        outcome = call.outcome()
        if outcome == "observed":
            outcome = offer_call(self._source, call)
        self._outcomes.labels(outcome).inc()


def offer_call(source: TableSource, call: CallAssembler) -> str:
    """Route a complete call (``call.outcome()`` is ``observed``) with ``source``'s table, count it in the route's
    request metrics and offer it to the route's tap; ``observed``, or ``unrouted``."""
    table = source.table
    request = call.request.messages[0]
    route, _ = table.route_for(call.method, request)
    if route is None:
        table.metrics.unrouted_calls.inc()
        return "unrouted"
    request_id, metadata = route.ids.identify(call.method, request, call.client_metadata())
    served_by = call.served_by or SERVED_BY_UNKNOWN
    record = call.record(route.name, served_by, request_id, metadata)
    route.metrics.attempt(served_by, "primary", record.code.name, record.latency)
    route.metrics.answered(record.code.name)
    if route.tap:
        route.tap.offer(record)
    return "observed"

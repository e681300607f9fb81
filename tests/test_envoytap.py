"""Reading Envoy's tap (proxy/observing/envoytap.py), without Envoy: the length-delimited trace stream, the chunked
body, a trace made into a call, the tap request Envoy is sent, and the ``envoy_tap`` configuration and reload.
(tests/test_envoy_tap.py runs it against the real Envoy.)"""

from __future__ import annotations

import json

import grpc
import pytest
from envoy.admin.v3 import tap_pb2
from envoy.config.core.v3 import base_pb2
from envoy.data.tap.v3 import http_pb2, wrapper_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from mlmirror.config import parse_config
from mlmirror.config.schema_process import EnvoyTap
from mlmirror.errors import ConfigError
from mlmirror.observing.adminhttp import ChunkedDecoder
from mlmirror.observing.envoytap import TraceStream, assemble_trace, tap_request
from mlmirror.protocol.names import MODEL_INFER, REQUEST_ID

from loadtest.h2load import grpc_frame
from loadtest.ports import free_port
from tests.support import running_proxy, wait_until

LIMIT = 1024


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint: 7 bits a byte, least significant first, the high bit on all but the last."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def delimited(messages: list[bytes]) -> bytes:
    return b"".join(varint(len(m)) + m for m in messages)


def test_the_reference_varint_is_protobufs():
    for n in (1, 127, 128, 300, 16_383, 16_384, 2_100_000):  # (an empty field is not written)
        # raw_value is field 3, bytes: tag 0x1a, then the length as protobuf writes it
        assert base_pb2.HeaderValue(raw_value=b"y" * n).SerializeToString() == b"\x1a" + varint(n) + b"y" * n


@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40),
)
def test_the_stream_gives_back_each_message_whatever_the_chunks(messages, cuts):
    data = delimited(messages)
    stream = TraceStream(limit=1000)
    got, at, i = [], 0, 0
    while at < len(data):
        step = cuts[i % len(cuts)]
        got.extend(stream.feed(data[at : at + step]))
        at, i = at + step, i + 1
    assert got == messages
    assert not stream.partial


def test_the_stream_waits_for_a_message_cut_short_and_refuses_one_over_its_limit():
    stream = TraceStream(limit=200)
    data = delimited([b"a" * 150])
    assert list(stream.feed(data[:-1])) == []
    assert stream.partial
    assert list(stream.feed(data[-1:])) == [b"a" * 150]
    with pytest.raises(ValueError, match="300 bytes"):
        list(TraceStream(limit=200).feed(delimited([b"b" * 300])))
    with pytest.raises(ValueError, match="64 bits"):
        list(TraceStream(limit=200).feed(b"\xff" * 11))


def headers(*pairs: tuple[str, str]) -> list[base_pb2.HeaderValue]:
    return [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]


def trace(
    request: bytes, response: bytes | None, *, status: str = "0", trailers_only: bool = False,
    truncated: str = "", times: tuple[float, float] | None = (100.0, 100.025),
) -> wrapper_pb2.TraceWrapper:  # fmt: skip
    """A trace as Envoy's tap filter gives one: request headers with the method and ids, the two bodies, the
    status in the trailers (or, trailers-only, in the response headers)."""
    http = http_pb2.HttpBufferedTrace()
    http.request.headers.extend(headers((":path", MODEL_INFER), ("x-request-id", "envoy-1"), (REQUEST_ID, "client-7"),
                                        ("content-type", "application/grpc"), ("team", "search")))  # fmt: skip
    http.request.body.as_bytes = request
    http.request.body.truncated = truncated == "request"
    response_headers = [(":status", "200"), ("x-mlmirror-served-by", "production")]
    if trailers_only:
        response_headers.append(("grpc-status", status))
    http.response.headers.extend(headers(*response_headers))
    if response is not None:
        http.response.body.as_bytes = response
    http.response.body.truncated = truncated == "response"
    if not trailers_only:
        http.response.trailers.extend(headers(("grpc-status", status)))
    if times is not None:
        http.request.headers_received_time.FromNanoseconds(int(times[0] * 1e9))
        http.response.headers_received_time.FromNanoseconds(int(times[1] * 1e9))
    return wrapper_pb2.TraceWrapper(http_buffered_trace=http)


def test_a_trace_becomes_the_call_envoy_carried():
    call = assemble_trace(trace(grpc_frame(b"question"), grpc_frame(b"answer")), LIMIT)
    assert call.outcome() == "observed"
    assert call.method == MODEL_INFER
    assert call.served_by == "production"
    assert ("team", "search") in call.client_metadata()
    assert (REQUEST_ID, "client-7") in call.client_metadata()
    record = call.record("iris", call.served_by, "client-7", call.client_metadata())
    assert (record.request, record.response, record.code) == (b"question", b"answer", grpc.StatusCode.OK)
    assert record.started == pytest.approx(100.0)
    assert record.latency == pytest.approx(0.025)


def test_without_header_times_the_latency_is_the_assemblers_own():
    call = assemble_trace(trace(grpc_frame(b"q"), grpc_frame(b"r"), times=None), LIMIT)
    record = call.record("iris", "production", "", ())
    assert 0 <= record.latency < 60
    assert record.started > 1e9  # now, in Unix seconds


def test_a_trailers_only_error_is_an_observed_call_without_an_answer():
    call = assemble_trace(trace(grpc_frame(b"q"), None, status="14", trailers_only=True), LIMIT)
    assert call.outcome() == "observed"
    record = call.record("iris", "production", "", ())
    assert (record.code, record.response) == (grpc.StatusCode.UNAVAILABLE, None)


@pytest.mark.parametrize("side", ["request", "response"])
def test_a_body_envoy_cut_at_the_limit_is_too_large(side):
    call = assemble_trace(trace(grpc_frame(b"q" * 10), grpc_frame(b"r" * 10), truncated=side), LIMIT)
    assert call.outcome() == "too_large"


@pytest.mark.parametrize(
    ("request_body", "response_body", "outcome"),
    [
        (grpc_frame(b"q")[:-1], grpc_frame(b"r"), "incomplete"),  # a frame cut short
        (grpc_frame(b"q") + grpc_frame(b"q"), grpc_frame(b"r"), "streaming"),
        (b"\x01" + grpc_frame(b"q")[1:], grpc_frame(b"r"), "compressed"),
        (grpc_frame(b"q" * 2000), grpc_frame(b"r"), "too_large"),  # over the observer's own limit
        (b"\x07" + grpc_frame(b"q")[1:], grpc_frame(b"r"), "malformed"),
    ],
)
def test_a_trace_that_is_not_one_unary_call_says_why(request_body, response_body, outcome):
    assert assemble_trace(trace(request_body, response_body), LIMIT).outcome() == outcome


def test_the_tap_request_is_one_envoy_accepts_and_says_what_it_should():
    settings = EnvoyTap(admin="127.0.0.1:9901", batch=250, flush=0.75, runtime_key="observed", config_id="edge")
    parsed = json_format.ParseDict(json.loads(tap_request(settings, 4096)), tap_pb2.TapRequest())  # unknown: raises
    assert parsed.config_id == "edge"
    config = parsed.tap_config
    (matcher,) = config.match.http_request_headers_match.headers
    assert (matcher.name, matcher.string_match.exact) == (":path", MODEL_INFER)
    assert config.tap_enabled.runtime_key == "observed"
    assert config.tap_enabled.default_value.numerator == 100
    output = config.output_config
    assert output.max_buffered_rx_bytes.value == output.max_buffered_tx_bytes.value == 4096 + 5
    (sink,) = output.sinks
    assert sink.format == sink.PROTO_BINARY_LENGTH_DELIMITED  # Envoy's streaming_admin would refuse binary
    assert sink.buffered_admin.max_traces == 250
    assert sink.buffered_admin.timeout.ToMilliseconds() == 750


ROUTES = "upstreams: {production: 127.0.0.1:1}\nroutes: [{name: a, match: {model: iris}, primary: production}]\n"


def test_envoy_tap_is_read_with_its_defaults():
    config = parse_config("mode: observer\nenvoy_tap: {admin: 127.0.0.1:9901}\n" + ROUTES)
    assert config.envoy_tap == EnvoyTap(admin="127.0.0.1:9901")
    assert (config.envoy_tap.batch, config.envoy_tap.flush, config.envoy_tap.method) == (5000, 5.0, MODEL_INFER)
    assert parse_config("mode: observer\n" + ROUTES).envoy_tap is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("envoy_tap: {admin: 127.0.0.1:9901}\n", "<string>:1: envoy_tap: .*needs mode: observer"),
        ("mode: observer\nenvoy_tap: {batch: 3}\n", "<string>:2: envoy_tap: missing required key 'admin'"),
        ("mode: observer\nenvoy_tap: {admin: nowhere}\n", "<string>:2: envoy_tap.admin: bad address"),
        ("mode: observer\nenvoy_tap: {admin: 127.0.0.1:1, method: Infer}\n", "envoy_tap.method: .*full gRPC"),
        ("mode: observer\nenvoy_tap: {admin: 127.0.0.1:1, batch: 0}\n", "envoy_tap.batch: must be >= 1"),
        ("mode: observer\nenvoy_tap: {admin: 127.0.0.1:1, flush: 1ms}\n", "envoy_tap.flush"),
        ("mode: observer\nenvoy_tap: {admin: 127.0.0.1:1, config_id: ' '}\n", "config_id cannot be empty"),
        ("mode: observer\nenvoy_tap: {admin: 127.0.0.1:1, batches: 5}\n", "envoy_tap.batches: unknown key"),
    ],
)
def test_a_wrong_envoy_tap_names_its_line_and_key(text, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(text + ROUTES)


def chunked(parts: list[bytes]) -> bytes:
    """``parts`` as a chunked HTTP/1.1 body (empty parts left out: an empty chunk ends the body)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


@given(
    st.lists(st.binary(max_size=200), max_size=10),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_a_chunked_body_is_decoded_whatever_the_reads(parts, cuts):
    data = chunked(parts)
    decoder = ChunkedDecoder()
    got, at, i = b"", 0, 0
    while at < len(data):
        assert not decoder.done
        step = cuts[i % len(cuts)]
        got += b"".join(decoder.feed(data[at : at + step]))
        at, i = at + step, i + 1
    assert decoder.done
    assert got == b"".join(parts)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"zz\r\nab\r\n", "not a chunk size"),
        (b"2\r\nabc\r\n", "not followed by CRLF"),
        (b"0\r\nx-trailer: 1\r\n\r\n", "trailers"),
        (b"1" * 100, "too long"),
    ],
)
def test_a_broken_chunked_body_raises(data, error):
    with pytest.raises(ValueError, match=error):
        ChunkedDecoder().feed(data)


async def test_a_reload_that_changes_envoy_tap_says_it_needs_a_restart_and_keeps_reading_as_before(caplog):
    nowhere = free_port()  # nothing listens: the reader retries, and says why
    text = f"mode: observer\nenvoy_tap: {{admin: 127.0.0.1:{nowhere}}}\n" + ROUTES
    async with running_proxy(text) as proxy:
        await wait_until(lambda: proxy.status()["envoy_tap"]["sessions"].get("failed", 0) >= 1, 30.0, "a failure")
        assert proxy.status()["envoy_tap"]["admin"] == f"127.0.0.1:{nowhere}"
        changed = parse_config(f"mode: observer\nenvoy_tap: {{admin: 127.0.0.1:{free_port()}}}\n" + ROUTES)
        await proxy.reload(changed)
        assert "envoy_tap changed; it takes effect only after a restart" in caplog.text
        assert proxy.status()["envoy_tap"]["admin"] == f"127.0.0.1:{nowhere}"

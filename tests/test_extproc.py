"""Observer mode's reassembly of calls from Envoy's ext_proc messages (proxy/observing/extproc.py), message by message:
body chunks split anywhere, statuses in trailers or in a trailers-only answer, and every reason a stream gives no
record. (tests/test_envoy_dataplane.py runs it behind the real Envoy.)"""

from __future__ import annotations

import base64

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from mlmirror.config import parse_config
from mlmirror.errors import ConfigError
from mlmirror.observing.extproc import CallAssembler, GrpcFrames
from mlmirror.protocol.names import MODEL_INFER, REQUEST_ID

from loadtest.h2load import grpc_frame

METHOD = MODEL_INFER
LIMIT = 1024


def headers(part: str, items: dict[str, str], *, raw: bool = True) -> ext.ProcessingRequest:
    values = [
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) if raw else base_pb2.HeaderValue(key=k, value=v)
        for k, v in items.items()
    ]
    if part == "response_trailers":
        return ext.ProcessingRequest(response_trailers=ext.HttpTrailers(trailers=base_pb2.HeaderMap(headers=values)))
    return ext.ProcessingRequest(**{part: ext.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))})


def body(part: str, chunk: bytes, end: bool = False) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(**{part: ext.HttpBody(body=chunk, end_of_stream=end)})


def call(request: bytes, response: bytes | None, status: str = "0", *, metadata: dict[str, str] | None = None,
         split: int = 0, raw: bool = True) -> CallAssembler:  # fmt: skip
    """A call assembled from the messages Envoy sends for it; bodies are cut at byte ``split`` (0: one chunk)."""
    assembler = CallAssembler(LIMIT)
    request_headers = {":path": METHOD, ":method": "POST", "content-type": "application/grpc", **(metadata or {})}
    assembler.take(headers("request_headers", request_headers, raw=raw))
    for part, payload in (("request_body", request), ("response_body", response)):
        if part == "response_body":
            if response is None:  # trailers-only: the status comes with the response headers
                assembler.take(headers("response_headers", {":status": "200", "grpc-status": status}))
                return assembler
            assembler.take(headers("response_headers", {":status": "200", "content-type": "application/grpc"}))
        cut = split if 0 < split < len(payload) else len(payload)
        assembler.take(body(part, payload[:cut]))
        if cut < len(payload):
            assembler.take(body(part, payload[cut:]))
    assembler.take(headers("response_trailers", {"grpc-status": status, "grpc-message": ""}))
    return assembler


def test_a_unary_call_becomes_one_record():
    assembler = call(grpc_frame(b"request"), grpc_frame(b"response"), metadata={"x-request-id": "envoy-1"})
    assert assembler.outcome() == "observed"
    record = assembler.record("iris", "production", "id-1", assembler.metadata)
    assert (record.method, record.request, record.response, record.code) == (
        METHOD, b"request", b"response", grpc.StatusCode.OK,
    )  # fmt: skip
    assert (record.route, record.served_by, record.role, record.request_id) == ("iris", "production", "primary", "id-1")
    assert record.latency >= 0
    assert "content-type" not in dict(record.metadata)
    assert ":path" not in dict(record.metadata)


@given(request=st.binary(max_size=300), response=st.binary(max_size=300), split=st.integers(0, 320))
def test_bodies_split_anywhere_reassemble_exactly(request: bytes, response: bytes, split: int):
    assembler = call(grpc_frame(request), grpc_frame(response), split=split)
    assert assembler.outcome() == "observed"
    assert assembler.request.messages == [request]
    assert assembler.response.messages == [response]


@given(messages=st.lists(st.binary(max_size=40), min_size=1, max_size=6), cuts=st.lists(st.integers(1, 30)))
def test_frames_are_read_whatever_the_chunking(messages: list[bytes], cuts: list[int]):
    stream = b"".join(grpc_frame(m) for m in messages)
    frames = GrpcFrames(LIMIT)
    position = 0
    for cut in cuts:
        frames.feed(stream[position : position + cut])
        position += cut
    frames.feed(stream[position:])
    assert frames.messages == messages
    assert not frames.partial
    assert frames.problem == ""


def test_the_status_comes_from_the_trailers_or_a_trailers_only_answer():
    failed = call(grpc_frame(b"request"), None, status="14")
    assert failed.outcome() == "observed"
    record = failed.record("iris", "production", "id", ())
    assert (record.code, record.response) == (grpc.StatusCode.UNAVAILABLE, None)

    late_error = call(grpc_frame(b"request"), b"", status="4")  # headers, no message, then an error status
    assert late_error.outcome() == "observed"
    assert late_error.record("iris", "p", "id", ()).code == grpc.StatusCode.DEADLINE_EXCEEDED

    unknown = call(grpc_frame(b"request"), grpc_frame(b"r"), status="99")
    assert unknown.code == grpc.StatusCode.UNKNOWN
    garbled = call(grpc_frame(b"request"), grpc_frame(b"r"), status="OK")
    assert garbled.code == grpc.StatusCode.UNKNOWN


def test_header_values_in_value_or_raw_value_and_binary_metadata():
    binary = base64.b64encode(b"\x00\x01\xff").decode().rstrip("=")
    for raw in (True, False):
        assembler = call(grpc_frame(b"q"), grpc_frame(b"r"), raw=raw,
                         metadata={"x-tenant": "a", "trace-bin": binary, "x-request-id": "envoy-7"})  # fmt: skip
        metadata = dict(assembler.metadata)
        assert assembler.method == METHOD
        assert metadata["x-tenant"] == "a"
        assert metadata["trace-bin"] == b"\x00\x01\xff"
        assert metadata[REQUEST_ID] == "envoy-7"  # Envoy's id names the call when the client gave none


def test_the_clients_own_request_id_wins_over_envoys():
    assembler = call(grpc_frame(b"q"), grpc_frame(b"r"), metadata={REQUEST_ID: "mine", "x-request-id": "envoy"})
    assert [value for key, value in assembler.metadata if key == REQUEST_ID] == ["mine"]


@pytest.mark.parametrize(
    ("request_body", "response_body", "status", "outcome"),
    [
        (b"\x01" + (3).to_bytes(4, "big") + b"abc", grpc_frame(b"r"), "0", "compressed"),
        (b"\x07" + (3).to_bytes(4, "big") + b"abc", grpc_frame(b"r"), "0", "malformed"),
        (grpc_frame(b"q"), b"\x00" + (LIMIT + 1).to_bytes(4, "big"), "0", "too_large"),
        (grpc_frame(b"q") + grpc_frame(b"q2"), grpc_frame(b"r"), "0", "streaming"),
        (grpc_frame(b"q"), grpc_frame(b"r") + grpc_frame(b"r2"), "0", "streaming"),
        (grpc_frame(b"q")[:-1], grpc_frame(b"r"), "0", "incomplete"),
        (grpc_frame(b"q"), b"", "0", "incomplete"),  # OK with no answer message
    ],
)
def test_streams_that_give_no_record_say_why(request_body: bytes, response_body: bytes, status: str, outcome: str):
    assert call(request_body, response_body, status).outcome() == outcome


def test_a_stream_cut_before_the_status_is_incomplete_and_one_without_a_path_malformed():
    cut = CallAssembler(LIMIT)
    cut.take(headers("request_headers", {":path": METHOD}))
    cut.take(body("request_body", grpc_frame(b"q")))
    assert cut.outcome() == "incomplete"
    pathless = CallAssembler(LIMIT)
    pathless.take(headers("request_headers", {":method": "POST"}))
    pathless.take(body("request_body", grpc_frame(b"q")))
    pathless.take(headers("response_trailers", {"grpc-status": "0"}))
    assert pathless.outcome() == "malformed"


def test_a_too_large_message_is_refused_from_its_header_without_buffering():
    frames = GrpcFrames(LIMIT)
    frames.feed(b"\x00" + (2**31).to_bytes(4, "big") + b"x" * 100)
    frames.feed(b"y" * 10_000)
    assert frames.problem == "too_large"
    assert not frames.partial
    assert frames.messages == []


def test_mode_is_proxy_or_observer():
    base = "upstreams: {p: 127.0.0.1:1}\nroutes: [{match: {}, primary: p}]\n"
    assert parse_config(base).mode == "proxy"
    assert parse_config("mode: observer\n" + base).mode == "observer"
    with pytest.raises(ConfigError, match=r"<string>:1: mode: unknown mode 'sidecar' \(one of proxy, observer\)"):
        parse_config("mode: sidecar\n" + base)


def attributes(**facts: str) -> dict[str, struct_pb2.Struct]:
    """What Envoy sends as ``ProcessingRequest.attributes``: the facts, under the filter's name."""
    fields = struct_pb2.Struct()
    for key, value in facts.items():
        fields.fields[key.replace("client_id", f'request.headers["{REQUEST_ID}"]')].string_value = value
    return {"envoy.filters.http.ext_proc": fields}


def as_dataplane_sends_it(request: bytes, response: bytes, request_facts: dict, response_facts: dict,
                          status: str = "0") -> CallAssembler:  # fmt: skip
    """A call as envoy/dataplane.yaml streams it: no request headers; attributes with each side's first message."""
    assembler = CallAssembler(LIMIT)
    first = ext.ProcessingRequest(request_body=ext.HttpBody(body=request, end_of_stream=True),
                                  attributes=attributes(**request_facts))  # fmt: skip
    assembler.take(first)
    answer = headers("response_headers", {":status": "200", "content-type": "application/grpc"})
    for key, value in attributes(**response_facts).items():
        answer.attributes[key].CopyFrom(value)
    assembler.take(answer)
    assembler.take(body("response_body", response))
    assembler.take(headers("response_trailers", {"grpc-status": status}))
    return assembler


def test_without_request_headers_the_attributes_give_the_method_ids_and_who_served():
    facts = {"request.path": METHOD, "request.id": "envoy-9", "client_id": "mine"}
    assembler = as_dataplane_sends_it(grpc_frame(b"q"), grpc_frame(b"r"), facts, {"xds.cluster_name": "prod-b"})
    assert assembler.outcome() == "observed"
    assert (assembler.method, assembler.served_by) == (METHOD, "prod-b")
    assert assembler.client_metadata() == ((REQUEST_ID, "mine"),)
    del facts["client_id"]
    assembler = as_dataplane_sends_it(grpc_frame(b"q"), grpc_frame(b"r"), facts, {})
    assert assembler.client_metadata() == ((REQUEST_ID, "envoy-9"),)  # Envoy's id when the client gave none
    assert assembler.served_by == ""  # the observer then says SERVED_BY_UNKNOWN


def test_without_request_headers_or_a_path_attribute_a_stream_is_malformed():
    assembler = as_dataplane_sends_it(grpc_frame(b"q"), grpc_frame(b"r"), {"request.id": "e"}, {})
    assert assembler.outcome() == "malformed"


def test_who_served_may_come_as_a_response_header_and_the_attribute_wins():
    assembler = call(grpc_frame(b"q"), grpc_frame(b"r"))
    assert assembler.served_by == ""
    header = CallAssembler(LIMIT)
    header.take(headers("request_headers", {":path": METHOD}))
    header.take(headers("response_headers", {":status": "200", "x-mlmirror-served-by": "canary"}))
    assert header.served_by == "canary"
    both = as_dataplane_sends_it(grpc_frame(b"q"), grpc_frame(b"r"), {"request.path": METHOD},
                                 {"xds.cluster_name": "prod-b"})  # fmt: skip
    assert both.served_by == "prod-b"

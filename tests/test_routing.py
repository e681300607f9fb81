"""Routing: the model name read from raw bytes agrees with protobuf; routes match in order; calls land right."""

from __future__ import annotations

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmirror.config import RouteMatch, parse_config
from mlmirror.protocol.wire import encode_string_field, read_string_field
from mlmirror.protos import inference_pb2
from mlmirror.serving.router import Router

from tests.support import EchoServer, through_proxy

names = st.text(max_size=40)
tensors = st.lists(
    st.builds(
        lambda name, shape: inference_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape),
        names,
        st.lists(st.integers(0, 2**40), max_size=4),
    ),
    max_size=3,
)


@settings(max_examples=max(300, settings.default.max_examples), deadline=None)
@given(
    model=names,
    version=names,
    request_id=names,
    inputs=tensors,
    raw=st.lists(st.binary(max_size=300), max_size=3),
    param=st.integers(-(2**63), 2**63 - 1),
)
def test_model_name_scan_agrees_with_protobuf(model, version, request_id, inputs, raw, param):
    request = inference_pb2.ModelInferRequest(
        model_name=model, model_version=version, id=request_id, inputs=inputs, raw_input_contents=raw
    )
    request.parameters["p"].int64_param = param
    data = request.SerializeToString()
    assert read_string_field(data, 1) == (model or None)
    assert read_string_field(data, 3) == (request_id or None)


@settings(max_examples=max(200, settings.default.max_examples), deadline=None)
@given(first=names, second=st.text(min_size=1, max_size=20), body=st.binary(max_size=200))
def test_the_last_occurrence_of_the_field_wins_as_in_protobuf(first, second, body):
    # Concatenated messages merge; protobuf keeps the last value of a singular field.
    data = inference_pb2.ModelInferRequest(
        model_name=first, raw_input_contents=[body]
    ).SerializeToString() + encode_string_field(1, second)
    assert inference_pb2.ModelInferRequest.FromString(data).model_name == second
    assert read_string_field(data, 1) == second


@settings(max_examples=max(500, settings.default.max_examples), deadline=None)
@given(st.binary(max_size=200))
def test_scanning_arbitrary_bytes_never_raises(data):
    result = read_string_field(data, 1)
    assert result is None or isinstance(result, str)


def test_malformed_messages_give_no_model():
    assert read_string_field(b"", 1) is None
    assert read_string_field(b"\x0a\x05iri", 1) is None  # length past the end
    assert read_string_field(b"\x0a\x02\xff\xfe", 1) is None  # not UTF-8
    assert read_string_field(b"\x0b", 1) is None  # group wire type
    assert read_string_field(b"\x08\x96", 1) is None  # truncated varint
    assert read_string_field(b"\x0a\x04iris\x12", 1) is None  # trailing garbage


def test_routes_match_in_order_by_method_and_model():
    router = Router(
        [
            (RouteMatch(model="iris", method="/inference.GRPCInferenceService/ModelInfer"), "iris-infer"),
            (RouteMatch(model="iris"), "iris-other"),
            (RouteMatch(method="/acme.Ranker/*"), "ranker"),
            (RouteMatch(method="/acme.Search/Query"), "search"),
            (RouteMatch(), "default"),
        ]
    )
    assert router.route("/inference.GRPCInferenceService/ModelInfer", "iris") == "iris-infer"
    assert router.route("/inference.GRPCInferenceService/ModelMetadata", "iris") == "iris-other"
    assert router.route("/inference.GRPCInferenceService/ModelInfer", "wine") == "default"
    assert router.route("/acme.Ranker/Rank", None) == "ranker"
    assert router.route("/acme.RankerX/Rank", None) == "default"
    assert router.route("/acme.Search/Query", None) == "search"
    assert router.route("/acme.Search/Other", None) == "default"
    assert Router([(RouteMatch(model="iris"), "iris")]).route("/x.Y/Z", None) is None


def test_the_model_is_read_only_when_a_route_needs_it():
    request = inference_pb2.ModelInferRequest(model_name="iris").SerializeToString()
    infer = "/inference.GRPCInferenceService/ModelInfer"
    assert Router([(RouteMatch(), "default")]).model_of(infer, request) is None
    assert Router([(RouteMatch(model="iris"), "iris")]).model_of(infer, request) == "iris"
    assert Router([(RouteMatch(model="iris"), "iris")]).model_of("/x.Y/Z", request) is None


async def test_calls_reach_the_upstream_their_model_and_method_route_to():
    infer = "/inference.GRPCInferenceService/ModelInfer"
    async with EchoServer("iris") as iris, EchoServer("wine") as wine, EchoServer("other") as other:
        config = f"""
        upstreams: {{iris: {iris.address}, wine: {wine.address}, other: {other.address}}}
        routes:
          - {{match: {{model: iris}}, primary: iris}}
          - {{match: {{model: wine, method: {infer}}}, primary: wine}}
          - {{match: {{}}, primary: other}}
        """
        async with through_proxy(config) as (_proxy, channel):
            stub = channel.unary_unary(infer)
            calls = {
                "iris": inference_pb2.ModelInferRequest(model_name="iris", id="1"),
                "wine": inference_pb2.ModelInferRequest(id="2", model_name="wine"),
                "unknown": inference_pb2.ModelInferRequest(model_name="beer"),
            }
            answers = {name: await stub(message.SerializeToString()) for name, message in calls.items()}
            unary = await channel.unary_unary("/test.Echo/Unary")(b"x")
    assert answers["iris"].startswith(b"iris:")
    assert answers["wine"].startswith(b"wine:")
    assert answers["unknown"].startswith(b"other:")
    assert unary == b"other:x"
    # The forwarded bytes are the client's, untouched.
    assert iris.received[0].requests[0] == calls["iris"].SerializeToString()


def test_route_names_and_chains_come_from_config():
    config = parse_config(
        "upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}\n"
        "routes:\n  - {match: {model: iris}, primary: a, fallback: [b]}\n  - {match: {method: /x.Y/Z}, primary: b}\n"
        "  - {match: {}, primary: a}\n"
    )
    assert [(r.name, r.chain) for r in config.routes] == [
        ("iris", ("a", "b")),
        ("route1", ("b",)),
        ("default", ("a",)),
    ]
    assert grpc.StatusCode.UNAVAILABLE in config.routes[0].fallback_on

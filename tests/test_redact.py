"""Redaction: named inputs are zeroed in what shadows and captures get; production's bytes are never touched."""

from __future__ import annotations

import base64
import json
import textwrap

import numpy as np
import pytest
from mlmirror.config import parse_config
from mlmirror.errors import ConfigError
from mlmirror.observing.redact import redact_request
from mlmirror.protocol.kserve import TensorError, request_inputs
from mlmirror.protos import inference_pb2

from tests.support import ECHO, EchoServer, through_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SECRET = np.array([[1234.5, 6789.25]], dtype="<f4")


def raw_request() -> inference_pb2.ModelInferRequest:
    """Raw contents: FP32 "secret", INT64 "x", BYTES "name"."""
    request = inference_pb2.ModelInferRequest(model_name="m", id="r1")
    request.inputs.add(name="secret", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(SECRET.tobytes())
    request.inputs.add(name="x", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.array([7, 8], dtype="<i8").tobytes())
    request.inputs.add(name="name", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(b"\x05\x00\x00\x00alice\x03\x00\x00\x00bob")
    return request


def decoded(data: bytes) -> dict[str, tuple[tuple[int, ...], list]]:
    _, tensors = request_inputs(data)
    return {t.name: (t.shape, t.values.ravel().tolist()) for t in tensors}


def test_raw_contents_are_zeroed_keeping_shapes_and_the_other_inputs():
    original = raw_request().SerializeToString()
    redacted = redact_request(MODEL_INFER, original, ("secret", "name"))
    assert decoded(redacted) == {
        "secret": ((1, 2), [0.0, 0.0]),
        "x": ((2,), [7, 8]),
        "name": ((2,), [b"", b""]),  # one empty element per declared element: still a valid [2] BYTES tensor
    }
    message = inference_pb2.ModelInferRequest.FromString(redacted)
    assert (message.model_name, message.id) == ("m", "r1")
    assert b"alice" not in redacted
    assert SECRET.tobytes() not in redacted


def test_typed_contents_are_zeroed_in_every_field():
    request = inference_pb2.ModelInferRequest(model_name="m")
    secret = request.inputs.add(name="secret", datatype="FP64", shape=[2])
    secret.contents.fp64_contents.extend([3.5, -1.0])
    flags = request.inputs.add(name="flags", datatype="BOOL", shape=[1])
    flags.contents.bool_contents.append(True)
    words = request.inputs.add(name="words", datatype="BYTES", shape=[1])
    words.contents.bytes_contents.append(b"hidden")
    request.inputs.add(name="kept", datatype="INT32", shape=[1]).contents.int_contents.append(5)
    redacted = redact_request(MODEL_INFER, request.SerializeToString(), ("secret", "flags", "words"))
    assert decoded(redacted) == {
        "secret": ((2,), [0.0, 0.0]),
        "flags": ((1,), [False]),
        "words": ((1,), [b""]),
        "kept": ((1,), [5]),
    }


def test_nothing_named_leaves_the_bytes_as_they_are_and_bad_requests_cannot_be_redacted():
    original = raw_request().SerializeToString()
    assert redact_request(MODEL_INFER, original, ("absent",)) is original
    short = raw_request()
    short.raw_input_contents[2] = b"\x00"  # a BYTES buffer too short for its 2 elements
    cases = {
        "not_kserve": ("/test.Echo/Unary", original),
        "malformed": (MODEL_INFER, b"\xff\xff\xff"),
        "byte_length": (MODEL_INFER, short.SerializeToString()),
    }
    for reason, (method, data) in cases.items():
        with pytest.raises(TensorError) as caught:
            redact_request(method, data, ("name",))
        assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("match", "redact", "words"),
    [
        ("{}", "[secret, secret]", "routes[0].redact[1]: input 'secret' is listed twice"),
        ("{}", "[]", "routes[0].redact: give the input tensors to redact, or leave redact out"),
        ("{method: /acme.Ranker/*}", "[secret]", "routes[0].redact: redact applies to KServe ModelInfer requests; "
         "this route matches only /acme.Ranker/*"),
    ],
)  # fmt: skip
def test_redact_config_errors_name_file_line_and_key(match: str, redact: str, words: str):
    text = f"upstreams: {{a: 127.0.0.1:1}}\nroutes:\n  - primary: a\n    match: {match}\n    redact: {redact}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "conf.yaml")
    assert f"conf.yaml:5: {words}" in str(caught.value)


def test_redact_reads_back_on_routes_that_carry_model_infer():
    for match in ("{}", "{model: m}", "{method: /inference.GRPCInferenceService/*}", f"{{method: {MODEL_INFER}}}"):
        text = f"upstreams: {{a: 127.0.0.1:1}}\nroutes:\n  - {{match: {match}, primary: a, redact: [s, t]}}\n"
        assert parse_config(text).routes[0].redact == ("s", "t")


async def test_shadows_and_captures_never_see_a_redacted_input_and_production_gets_the_bytes_sent(tmp_path):
    async with EchoServer("production") as production, EchoServer("shadow") as shadow:
        config = f"""
        mirror_shed_lag: off
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{production: {production.address}, shadow: {shadow.address}}}
        routes:
          - name: m
            match: {{}}
            primary: production
            shadows: [{{upstream: shadow}}]
            redact: [secret, name]
            capture: {{path: {tmp_path}}}
        """
        async with through_proxy(textwrap.dedent(config)) as (proxy, channel):
            sent = raw_request().SerializeToString()
            assert await channel.unary_unary(MODEL_INFER)(sent, timeout=5) == b"production:" + sent
            assert await channel.unary_unary(ECHO + "Unary")(b"opaque", timeout=5) == b"production:opaque"

            def capture() -> dict:
                return proxy.status()["routes"][0]["capture"]

            await wait_until(lambda: len(shadow.received) == 1, what="the shadow's copy")
            await wait_until(lambda: capture()["records"] + capture()["dropped"]["unredactable"] == 2, what="both")
            shadows = proxy.status()["routes"][0]["shadows"]
    assert [r.requests for r in production.received] == [[sent], [b"opaque"]]  # production: untouched
    (copy,) = shadow.received[0].requests
    assert decoded(copy) == {"secret": ((1, 2), [0.0, 0.0]), "x": ((2,), [7, 8]), "name": ((2,), [b"", b""])}
    assert shadows[0]["dropped"]["unredactable"] == 1  # the opaque call is not mirrored: it cannot be redacted
    assert capture()["dropped"]["unredactable"] == 1
    (file,) = tmp_path.glob("*.jsonl")
    text = file.read_text()
    (entry,) = [json.loads(line) for line in text.splitlines()]
    assert entry["redacted"] == ["secret", "name"]
    assert base64.b64decode(entry["request"]) == copy
    assert entry["inputs"] == [
        {"name": "secret", "datatype": "FP32", "shape": [1, 2], "redacted": True},
        {"name": "x", "datatype": "INT64", "shape": [2], "data": [7, 8]},
        {"name": "name", "datatype": "BYTES", "shape": [2], "redacted": True},
    ]
    for value in ("1234.5", "6789.25", "alice", base64.b64encode(sent).decode()):
        assert value not in text

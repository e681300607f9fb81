"""Sending captured calls to a real gRPC server: bytes as captured, the model name replaced on request, ids and the
replay marker in the metadata, bounded concurrency, a rate, errors by code, and an unreachable target."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest
from mlmirror.config import TlsClient
from mlmirror.errors import ReplayError
from mlmirror.protos import inference_pb2
from mlmirror.replay.captured import CapturedCall
from mlmirror.replay.sender import SendOptions, send_calls

from tests.support import ECHO, EchoServer
from tests.test_tls import _tls_echo, certs  # noqa: F401 - certs is a fixture

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def call(request: bytes, method: str = ECHO + "Unary", request_id: str = "r1") -> CapturedCall:
    return CapturedCall(request_id=request_id, route="r", method=method, model_name=None, request=request,
                        response=None, code=grpc.StatusCode.OK, latency=0.0, upstream_latency=0.0)  # fmt: skip


class InFlight(grpc.GenericRpcHandler):
    """A unary method that waits ``sleep`` seconds and records the most calls it had at once."""

    def __init__(self, sleep: float) -> None:
        self.sleep, self.now, self.most, self.started = sleep, 0, 0, []

    def service(self, details):
        async def handle(request, context):
            self.started.append(time.monotonic())
            self.now += 1
            self.most = max(self.most, self.now)
            await asyncio.sleep(self.sleep)
            self.now -= 1
            return request

        return grpc.unary_unary_rpc_method_handler(handle)


async def serve(handler: grpc.GenericRpcHandler) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_requests_go_as_captured_with_the_id_and_the_replay_marker():
    async with EchoServer("candidate") as echo:
        answers = await send_calls([call(b"\x00\x01 raw", request_id="id-7")], echo.address, SendOptions())
    [received] = echo.received
    assert received.requests == [b"\x00\x01 raw"]
    assert received.metadata["x-mlmirror-request-id"] == "id-7"
    assert received.metadata["x-mlmirror-replay"] == "1"
    assert (answers[0].code, answers[0].response) == (grpc.StatusCode.OK, b"candidate:\x00\x01 raw")
    assert answers[0].latency > 0


async def test_model_replaces_the_kserve_model_name_and_nothing_else():
    original = inference_pb2.ModelInferRequest(model_name="iris", model_version="1", id="x")
    original.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    original.raw_input_contents.append(bytes(16))
    async with EchoServer("candidate") as echo:
        await send_calls([call(original.SerializeToString(), MODEL_INFER)], echo.address, SendOptions(model="iris-v2"))
        await send_calls([call(b"opaque")], echo.address, SendOptions(model="iris-v2"))
    sent = inference_pb2.ModelInferRequest.FromString(echo.received[0].requests[0])
    expected = inference_pb2.ModelInferRequest()
    expected.CopyFrom(original)
    expected.model_name = "iris-v2"
    assert sent == expected
    assert echo.received[1].requests == [b"opaque"]  # not a KServe call: untouched


async def test_errors_come_back_by_code():
    async with EchoServer("candidate", fail_with=grpc.StatusCode.RESOURCE_EXHAUSTED) as echo:
        answers = await send_calls([call(b"a"), call(b"b")], echo.address, SendOptions())
    assert [(a.code, a.response, a.details) for a in answers] == [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, "echo failure from candidate")
    ] * 2


async def test_concurrency_bounds_the_calls_in_flight_and_answers_keep_their_order():
    handler = InFlight(sleep=0.1)
    server, address = await serve(handler)
    try:
        calls = [call(b"%d" % i) for i in range(24)]
        answers = await send_calls(calls, address, SendOptions(concurrency=3))
    finally:
        await server.stop(None)
    assert [a.response for a in answers] == [c.request for c in calls]
    assert 2 <= handler.most <= 3


async def test_a_rate_spaces_the_calls_out():
    handler = InFlight(sleep=0.0)
    server, address = await serve(handler)
    try:
        await send_calls([call(b"x")] * 11, address, SendOptions(concurrency=4, rate=20.0))
    finally:
        await server.stop(None)
    # Call i starts no earlier than i / rate seconds after the first (a lower bound: a slow machine only adds).
    assert handler.started[-1] - handler.started[0] >= 10 / 20.0 - 0.02


async def test_an_unreachable_target_is_a_replay_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ReplayError, match=f"target {dead} unreachable: no connection within 0.5s"):
        await send_calls([call(b"x")], dead, SendOptions(connect_timeout=0.5))


async def test_mutual_tls_to_the_target(certs: Path):  # noqa: F811 - the fixture
    echo = await _tls_echo(certs, client_certs=True)
    try:
        tls = TlsClient(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key"))
        [answer] = await send_calls([call(b"secret")], echo.address, SendOptions(tls=tls))
    finally:
        await echo.stop()
    assert (answer.code, answer.response) == (grpc.StatusCode.OK, b"tls:secret")
    with pytest.raises(ReplayError, match=r"nope\.pem: cannot read the TLS file"):
        await send_calls([call(b"x")], echo.address, SendOptions(tls=TlsClient(ca=str(certs / "nope.pem"))))

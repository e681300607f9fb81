"""The proxy is transparent: bytes, metadata, deadlines, statuses and trailers cross it unchanged."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mlmirror.demo.traffic import infer_request
from mlmirror.protos import inference_pb2

from tests.support import ECHO, EchoServer, _EchoHandler, model_server, running_proxy, through_proxy, wait_ready

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _one_upstream(address: str, extra: str = "", upstream_extra: str = "") -> str:
    return f"""
{extra}
upstreams:
  up: {{address: {address}{upstream_extra}}}
routes:
  - match: {{}}
    primary: up
"""


def _typed_request(dtype: str) -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="iris", id="typed-1")
    tensor = request.inputs.add(name="input", datatype=dtype, shape=[2, 4])
    values = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
    if dtype == "FP32":
        tensor.contents.fp32_contents.extend(values)
    else:
        tensor.contents.fp64_contents.extend(values)
    request.parameters["priority"].int64_param = 3
    return request.SerializeToString()


async def _call(channel: grpc.aio.Channel, method: str, request: bytes, **kwargs):
    """(response or None, code, details, trailing metadata) of a unary call."""
    call = channel.unary_unary(method)(request, **kwargs)
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return None, error.code(), error.details(), error.trailing_metadata()
    return response, grpc.StatusCode.OK, None, await call.trailing_metadata()


async def test_model_infer_answers_are_byte_identical_to_calling_the_model_directly():
    requests = {
        "raw FP32": infer_request(
            np.random.default_rng(1).normal(5, 1, size=(8, 4)).astype(np.float32), request_id="r"
        ),
        "typed FP32": _typed_request("FP32"),
        "typed FP64": _typed_request("FP64"),
        "wrong shape": inference_pb2.ModelInferRequest(
            model_name="iris", inputs=[{"name": "input", "datatype": "FP32", "shape": [3]}]
        ).SerializeToString(),
        "malformed protobuf": b"\x0a\xff\xff\xff\xff\x0fgarbage",
    }
    async with (
        model_server("production") as port,
        running_proxy(_one_upstream(f"127.0.0.1:{port}")) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as direct,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as via,
    ):
        for name, request in requests.items():
            d_response, d_code, d_details, _ = await _call(direct, MODEL_INFER, request)
            p_response, p_code, p_details, trailing = await _call(via, MODEL_INFER, request)
            assert (p_response, p_code, p_details) == (d_response, d_code, d_details), name
            assert dict(trailing)["x-mlmirror-served-by"] == "up", name
            if name.startswith(("raw", "typed")):
                assert d_code is grpc.StatusCode.OK, name
                assert len(d_response) > 20, name
            else:
                assert d_code is not grpc.StatusCode.OK, name


async def test_metadata_passes_through_minus_hop_by_hop_headers():
    async with EchoServer("a") as echo, through_proxy(_one_upstream(echo.address)) as (_proxy, channel):
        metadata = (
            ("x-tenant", "acme"),
            ("x-trace-bin", b"\x00\x01\xfe"),
            ("connection", "keep-alive"),
            ("x-repeated", "1"),
            ("x-repeated", "2"),
        )
        await channel.unary_unary(ECHO + "Unary")(b"hi", metadata=metadata)
    received = echo.received[0].metadata
    assert received["x-tenant"] == "acme"
    assert received["x-trace-bin"] == b"\x00\x01\xfe"
    assert "connection" not in received
    assert received["user-agent"].startswith("grpc-python")  # the proxy's own hop
    repeated = [item for item in echo.received[0].metadata_items if item[0] == "x-repeated"]
    assert repeated == [("x-repeated", "1"), ("x-repeated", "2")]


async def test_client_deadline_and_upstream_timeout_both_cap_the_upstream_call():
    async with (
        EchoServer("a") as echo,
        through_proxy(_one_upstream(echo.address, upstream_extra=", timeout: 700ms")) as (_proxy, channel),
    ):
        stub = channel.unary_unary(ECHO + "Unary")
        await stub(b"long", timeout=30)
        await stub(b"short", timeout=0.4)
        await stub(b"none")
    long, short, none = (r.time_remaining for r in echo.received)
    slack = 0.01  # grpc-timeout travels rounded up to its unit
    # The caps are the upper bounds; the lower ones leave a busy machine's hop through the proxy room.
    assert 0.35 < long <= 0.7 + slack  # the upstream timeout is the tighter bound
    assert 0.1 < short <= 0.4 + slack  # the client's remaining deadline is
    assert 0.35 < none <= 0.7 + slack


async def test_no_deadline_at_all_stays_no_deadline():
    async with EchoServer("a") as echo, through_proxy(_one_upstream(echo.address)) as (_proxy, channel):
        await channel.unary_unary(ECHO + "Unary")(b"x")
    assert echo.received[0].time_remaining is None


async def test_status_details_initial_and_trailing_metadata_pass_through():
    async with EchoServer("a") as echo, through_proxy(_one_upstream(echo.address)) as (_proxy, channel):
        stub = channel.unary_unary(ECHO + "Unary")
        call = stub(b"ok", metadata=(("x-test-initial", "hello"),))
        assert await call == b"a:ok"
        assert dict(await call.initial_metadata())["x-initial"] == "hello"
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-trailer"] == "a"
        assert trailing["x-trailer-bin"] == b"\x00\xff"
        assert trailing["x-mlmirror-served-by"] == "up"

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub(b"bad", metadata=(("x-test-code", "FAILED_PRECONDITION"),))
    error = failure.value
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "echo failure from a"
    trailing = dict(error.trailing_metadata())
    assert trailing["x-trailer"] == "a"
    assert trailing["x-trailer-bin"] == b"\x00\xff"
    assert trailing["x-mlmirror-served-by"] == "up"


CALL_TYPE_CONFIGS = {
    "stream relay for unknown methods": "",
    "declared call types": f"""
method_types:
  {ECHO}Unary: unary_unary
  {ECHO}ServerStream: unary_stream
  {ECHO}ClientStream: stream_unary
  {ECHO}Bidi: stream_stream
""",
}


@pytest.mark.parametrize("method_types", CALL_TYPE_CONFIGS.values(), ids=CALL_TYPE_CONFIGS.keys())
async def test_all_four_call_types_are_relayed_exactly(method_types: str):
    async with EchoServer("a") as echo:

        async def exchange(channel: grpc.aio.Channel) -> list:
            unary = await channel.unary_unary(ECHO + "Unary")(b"u1")
            server_stream = [
                m async for m in channel.unary_stream(ECHO + "ServerStream")(b"s", metadata=(("x-test-messages", "5"),))
            ]
            client_stream = await channel.stream_unary(ECHO + "ClientStream")(iter([b"c1", b"c2", b"c3"]))
            bidi = [m async for m in channel.stream_stream(ECHO + "Bidi")(iter([b"b1", b"b2"]))]
            empty = [
                m async for m in channel.unary_stream(ECHO + "ServerStream")(b"s", metadata=(("x-test-messages", "0"),))
            ]
            return [unary, server_stream, client_stream, bidi, empty]

        async with (
            through_proxy(_one_upstream(echo.address, extra=method_types)) as (_proxy, via),
            grpc.aio.insecure_channel(echo.address) as direct,
        ):
            expected = await exchange(direct)
            got = await exchange(via)
    assert got == expected
    assert got[1] == [b"s#0", b"s#1", b"s#2", b"s#3", b"s#4"]
    assert got[2] == b"c1|c2|c3"
    assert got[3] == [b"re:b1", b"re:b2"]


@pytest.mark.parametrize("method_types", CALL_TYPE_CONFIGS.values(), ids=CALL_TYPE_CONFIGS.keys())
async def test_streaming_errors_and_trailers_pass_through(method_types: str):
    async with (
        EchoServer("a") as echo,
        through_proxy(_one_upstream(echo.address, extra=method_types)) as (_proxy, channel),
    ):
        call = channel.stream_stream(ECHO + "Bidi")(iter([b"x"]), metadata=(("x-test-code", "ABORTED"),))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            _ = [m async for m in call]
        ok = channel.unary_stream(ECHO + "ServerStream")(b"s")
        _ = [m async for m in ok]
        trailing = dict(await ok.trailing_metadata())
    assert failure.value.code() is grpc.StatusCode.ABORTED
    assert failure.value.details() == "echo failure from a"
    assert dict(failure.value.trailing_metadata())["x-mlmirror-served-by"] == "up"
    assert trailing["x-trailer"] == "a"
    assert trailing["x-mlmirror-served-by"] == "up"


async def test_a_message_over_the_size_limit_is_refused_with_resource_exhausted():
    async with (
        EchoServer("a") as echo,
        through_proxy(_one_upstream(echo.address, extra="max_message_size: 64KiB")) as (_proxy, channel),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await channel.unary_unary(ECHO + "Unary")(b"x" * 100_000)
        assert await channel.unary_unary(ECHO + "Unary")(b"x" * 60_000) == b"a:" + b"x" * 60_000
    assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in failure.value.details()
    assert len(echo.received) == 1  # only the call within the limit reached the upstream


async def test_a_method_no_route_matches_gets_unimplemented():
    async with EchoServer("a") as echo:
        config = f"""
    upstreams:
      up: {echo.address}
    routes:
      - match: {{method: /test.Echo/Unary}}
        primary: up
    """
        async with running_proxy(config) as proxy:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await channel.unary_unary("/other.Service/Call")(b"x")
                assert await channel.unary_unary(ECHO + "Unary")(b"y") == b"a:y"
            samples = {s.name: s.value for m in proxy.metrics.unrouted_calls.collect() for s in m.samples}
    assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "no route for method /other.Service/Call" in failure.value.details()
    assert samples["mlmirror_unrouted_calls_total"] == 1


async def test_listener_serves_grpc_health_and_reflection():
    async with model_server("production") as port:
        config = _one_upstream(f"127.0.0.1:{port}", upstream_extra=", health_check: {interval: 100ms}")
        async with running_proxy(config) as proxy:
            await wait_ready(proxy)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs package declares no methods
                overall = await health.Check(health_pb2.HealthCheckRequest())
                kserve = await health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                services = [s.name async for r in responses for s in r.list_services_response.service]
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert kserve.status == health_pb2.HealthCheckResponse.SERVING
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services


async def test_upstreams_may_be_grpc_target_uris(tmp_path):
    socket_path = tmp_path / "model.sock"
    echo = EchoServer("unix")
    echo.server = grpc.aio.server()
    echo.server.add_generic_rpc_handlers((_EchoHandler(echo),))
    echo.server.add_insecure_port(f"unix://{socket_path}")
    await echo.server.start()
    async with echo, through_proxy(_one_upstream(f"unix://{socket_path}")) as (_, channel):
        answer = await channel.unary_unary(ECHO + "Unary")(b"over a socket")
    assert answer == b"unix:over a socket"

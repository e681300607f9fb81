"""Graceful fallback: the chain is walked on the configured statuses and open circuits, inside the deadline."""

from __future__ import annotations

import textwrap
import time

import grpc
import numpy as np
import pytest
from mlmirror.demo.traffic import infer_request
from mlmirror.handoff.tap import CallRecord
from mlmirror.protos import inference_pb2

from loadtest.ports import free_port
from tests.support import ECHO, EchoServer, through_proxy

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def chain_config(primary: str, fallback: str, route_extra: str = "", primary_extra: str = "", top: str = "") -> str:
    """primary → fallback on one catch-all route named r; ``route_extra`` lines go into the route."""
    route_lines = textwrap.indent(textwrap.dedent(route_extra).strip(), " " * 4)
    return f"""{top}
upstreams:
  primary: {{address: {primary}{primary_extra}}}
  fallback: {{address: {fallback}}}
routes:
  - name: r
    match: {{}}
    primary: primary
    fallback: [fallback]
{route_lines}
"""


def metric(proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def unary(channel: grpc.aio.Channel, payload: bytes = b"x", **kwargs):
    call = channel.unary_unary(ECHO + "Unary")(payload, **kwargs)
    answer = await call
    return answer, dict(await call.trailing_metadata())


TRIGGERS = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED]


@pytest.mark.parametrize("code", TRIGGERS, ids=lambda c: c.name)
async def test_each_default_trigger_status_falls_back(code: grpc.StatusCode):
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = code
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            answer, trailing = await unary(channel)
            assert answer == b"f:x"
            assert trailing["x-mlmirror-served-by"] == "fallback"
            reason = code.name.lower()
            assert (
                metric(
                    proxy, "mlmirror_fallbacks_total", route="r", from_upstream="primary", to="fallback", reason=reason
                )
                == 1
            )
            assert (
                metric(
                    proxy, "mlmirror_requests_total", route="r", upstream="primary", role="primary", grpc_code=code.name
                )
                == 1
            )
            assert (
                metric(
                    proxy, "mlmirror_requests_total", route="r", upstream="fallback", role="fallback", grpc_code="OK"
                )
                == 1
            )
            assert metric(proxy, "mlmirror_calls_total", route="r", grpc_code="OK") == 1


async def test_a_real_upstream_timeout_falls_back_within_the_client_deadline():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.sleep = 2.0
        config = chain_config(primary.address, fallback.address, primary_extra=", timeout: 200ms")
        async with through_proxy(config) as (proxy, channel):
            started = time.monotonic()
            answer, trailing = await unary(channel, timeout=3.0)
            elapsed = time.monotonic() - started
    assert answer == b"f:x"  # answered within the client's 3 s deadline (or the call would have failed)...
    assert elapsed >= 0.2  # ...after the primary's 200 ms timeout
    assert 0.0 < fallback.received[0].time_remaining < 2.85  # the fallback got what was left of the client's 3 s


async def test_an_unreachable_primary_falls_back():
    config = chain_config(f"127.0.0.1:{free_port()}", "{fallback}")
    async with (
        EchoServer("f") as fallback,
        through_proxy(config.replace("{fallback}", fallback.address)) as (_, channel),
    ):
        answer, trailing = await unary(channel)
    assert answer == b"f:x"
    assert trailing["x-mlmirror-served-by"] == "fallback"


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL],
    ids=lambda c: c.name,
)
async def test_other_statuses_are_relayed_not_retried(code: grpc.StatusCode):
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = code
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await unary(channel)
    assert failure.value.code() is code
    assert failure.value.details() == "echo failure from p"
    assert dict(failure.value.trailing_metadata())["x-mlmirror-served-by"] == "primary"
    assert fallback.received == []


async def test_fallback_on_is_configurable_per_route():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        config = chain_config(primary.address, fallback.address, route_extra="fallback_on: [INTERNAL]")
        async with through_proxy(config) as (proxy, channel):
            primary.fail_with = grpc.StatusCode.INTERNAL
            answer, _ = await unary(channel)
            primary.fail_with = grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await unary(channel)
    assert answer == b"f:x"
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_an_open_circuit_sends_calls_straight_to_the_fallback():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        config = chain_config(
            primary.address,
            fallback.address,
            primary_extra=", circuit: {failures: 3, ejection: 30s, max_ejection: 60s}",
        )
        async with through_proxy(config) as (proxy, channel):
            for _ in range(10):
                answer, trailing = await unary(channel)
                assert answer == b"f:x"
            assert proxy.table.targets["primary"].breaker.state.name == "OPEN"
            assert metric(proxy, "mlmirror_circuit_state", upstream="primary") == 1
            assert metric(proxy, "mlmirror_circuit_ejections_total", upstream="primary") == 1
            assert (
                metric(
                    proxy,
                    "mlmirror_fallbacks_total",
                    route="r",
                    from_upstream="primary",
                    to="fallback",
                    reason="circuit_open",
                )
                == 7
            )
    assert len(primary.received) == 3  # the three failures that opened it; none after
    assert len(fallback.received) == 10


async def test_the_static_default_answers_when_the_whole_chain_fails():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = fallback.fail_with = grpc.StatusCode.UNAVAILABLE
        static = """
            static_response:
              model_version: fallback-v0
              outputs:
                - {name: probabilities, datatype: FP32, shape: [-1, 3], data: [0.5, 0.25, 0.25]}
                - {name: label, datatype: BYTES, shape: [-1], data: [setosa]}
                - {name: calibrated, datatype: BOOL, shape: [1], data: [false]}
            """
        config = chain_config(primary.address, fallback.address, route_extra=static)
        async with through_proxy(config) as (proxy, channel):
            request = infer_request(np.ones((4, 4), dtype=np.float32), model="iris", request_id="req-7")
            call = channel.unary_unary(MODEL_INFER)(request)
            answer = inference_pb2.ModelInferResponse.FromString(await call)
            trailing = dict(await call.trailing_metadata())
            labels = {"route": "r", "from_upstream": "fallback", "to": "static-default", "reason": "unavailable"}
            assert metric(proxy, "mlmirror_fallbacks_total", **labels) == 1
    assert trailing["x-mlmirror-served-by"] == "static-default"
    assert (answer.model_name, answer.model_version, answer.id) == ("iris", "fallback-v0", "req-7")
    probabilities, label, calibrated = answer.outputs
    assert list(probabilities.shape) == [4, 3]
    np.testing.assert_array_equal(
        np.array(probabilities.contents.fp32_contents).reshape(4, 3), np.tile([0.5, 0.25, 0.25], (4, 1))
    )
    assert list(label.contents.bytes_contents) == [b"setosa"] * 4
    assert list(calibrated.shape) == [1]
    assert list(calibrated.contents.bool_contents) == [False]


async def test_without_a_static_default_the_last_error_is_relayed():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        fallback.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await unary(channel)
            labels = {"route": "r", "from_upstream": "fallback", "to": "none", "reason": "resource_exhausted"}
            assert metric(proxy, "mlmirror_fallbacks_total", **labels) == 1
            assert metric(proxy, "mlmirror_calls_total", route="r", grpc_code="RESOURCE_EXHAUSTED") == 1
    assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.value.details() == "echo failure from f"
    assert dict(failure.value.trailing_metadata())["x-mlmirror-served-by"] == "fallback"


async def test_the_client_deadline_bounds_the_whole_chain():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.sleep = fallback.sleep = 5.0
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await unary(channel, timeout=0.3)
            elapsed = time.monotonic() - started
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.5  # the client's 0.3 s, not the upstreams' 5 s each
    assert fallback.received == []  # no time was left to try it


async def test_a_server_stream_falls_back_when_the_primary_fails_before_its_first_message():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            call = channel.unary_stream(ECHO + "ServerStream")(b"s")
            messages = [m async for m in call]
            trailing = dict(await call.trailing_metadata())
    assert messages == [b"s#0", b"s#1", b"s#2"]
    assert trailing["x-mlmirror-served-by"] == "fallback"


async def test_a_client_stream_is_replayed_to_the_fallback():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        async with through_proxy(chain_config(primary.address, fallback.address)) as (proxy, channel):
            answer = await channel.stream_unary(ECHO + "ClientStream")(iter([b"m1", b"m2", b"m3"]))
    assert answer == b"m1|m2|m3"
    assert primary.received[0].requests == [b"m1", b"m2", b"m3"]
    assert fallback.received[0].requests == [b"m1", b"m2", b"m3"]


async def test_a_request_stream_over_the_replay_budget_is_not_retried():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        config = chain_config(primary.address, fallback.address, top="stream_replay_limit: 1KiB")
        async with through_proxy(config) as (proxy, channel):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await channel.stream_unary(ECHO + "ClientStream")(iter([b"a" * 800, b"b" * 800]))
            answer = await channel.stream_unary(ECHO + "ClientStream")(iter([b"small"]))
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert answer == b"small"  # a stream within the budget still falls back
    assert [r.requests for r in fallback.received] == [[b"small"]]


async def test_a_bidi_stream_that_outgrows_the_budget_still_flows_end_to_end():
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        config = chain_config(primary.address, fallback.address, top="stream_replay_limit: 1KiB")
        messages = [bytes([i % 251]) * 500 for i in range(200)]  # 100 KB through a 1 KiB budget
        async with through_proxy(config) as (proxy, channel):
            replies = [m async for m in channel.stream_stream(ECHO + "Bidi")(iter(messages))]
    assert replies == [b"re:" + m for m in messages]


class ExplodingObserver:
    name = "exploding"

    def __init__(self) -> None:
        self.offered = 0

    def offer(self, record: CallRecord) -> None:
        self.offered += 1
        raise RuntimeError("observer bug")


async def test_an_observer_that_raises_never_fails_a_call():
    observer = ExplodingObserver()
    async with EchoServer("p") as primary, EchoServer("f") as fallback:
        # Observers see answered unary calls; declare the echo method unary so that it is tapped.
        config = chain_config(primary.address, fallback.address, top=f"method_types: {{{ECHO}Unary: unary_unary}}")
        async with through_proxy(config, observers=[observer]) as (proxy, channel):
            answers = [await unary(channel, f"{i}".encode()) for i in range(20)]
            errors = metric(proxy, "mlmirror_observer_errors_total", observer="exploding")
    assert [a for a, _ in answers] == [f"p:{i}".encode() for i in range(20)]
    assert observer.offered == 20
    assert errors == 20

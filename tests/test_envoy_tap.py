"""envoy/dataplane-tap.yaml with the real Envoy binary: Envoy carries the calls, and mlmirror in observer mode reads
them in batches from Envoy's tap admin (``envoy_tap``). Every call read reaches the route's metrics and its drift
engine; an observer that is not there, or one that attaches and never reads, fails and holds no call; a second
reader is refused and says why; and the reader attaches again once it can."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.envoytap import TraceStream
from mlmirror.protocol.names import MODEL_INFER

from loadtest.envoy import DATAPLANE_TAP, load, on_ports
from loadtest.ports import free_port
from tests.support import FunctionModel, envoy_running, running_proxy, wait_until
from tests.test_envoy_dataplane import iris_outputs, scrape, send
from tests.test_observer_process import status_of
from tests.test_workers import admin_get, polled, process_group

pytestmark = pytest.mark.process  # starts Envoy

WAIT = 30.0  # seconds: Envoy's start and a batch, on a busy machine


def tap_observer(production: FunctionModel, envoy_admin: int, *, batch: int = 50, max_size: str = "4MiB") -> str:
    return f"""
    mode: observer
    mirror_shed_lag: off
    max_message_size: {max_size}
    envoy_tap: {{admin: 127.0.0.1:{envoy_admin}, batch: {batch}, flush: 100ms}}
    upstreams: {{production: {production.address}}}
    routes:
      - name: iris
        match: {{model: iris}}
        primary: production
        drift: {{window: 100, capture: 100, bins: 10}}
    """


@contextlib.asynccontextmanager
async def tapped_dataplane(tmp: Path, production: int, shadow: int, admin: int):
    """Envoy on envoy/dataplane-tap.yaml, its admin on ``admin``; yields a client channel to it."""
    listen = free_port()
    config = on_ports(load(DATAPLANE_TAP), listen, admin, {"production": [production], "shadow": [shadow]})
    async with envoy_running(config, tmp), grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
        yield channel


def outcomes(observer) -> dict[str, int]:
    return observer.status()["envoy_tap"]["calls"]


async def send_until(channel, rng, enough, what: str) -> int:
    """Calls in rounds of 20 until ``enough()``; how many were sent."""
    sent = 0
    for _ in range(200):
        if enough():
            return sent
        await send(channel, rng, 20)
        sent += 20
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not after {sent} calls")


async def test_every_call_read_from_the_tap_reaches_the_routes_metrics_and_its_drift_engine(tmp_path):
    rng = np.random.default_rng(11)
    admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(tap_observer(production, admin)) as observer,
        tapped_dataplane(tmp_path, production.port, shadow.port, admin) as channel,
    ):
        await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached")
        sent = await send_until(channel, rng, lambda: outcomes(observer).get("observed", 0) >= 250, "250 calls read")
        await wait_until(lambda: shadow.calls == sent, WAIT, "Envoy's mirrored copies")

        def settled() -> bool:  # the drift engine has counted every call read (it runs on its own thread)
            status = observer.status()
            return status["routes"][0]["drift"]["calls"] == status["envoy_tap"]["calls"]["observed"]

        await wait_until(settled, WAIT, "the drift engine caught up")
        status = observer.status()
        read = status["envoy_tap"]["calls"]
        assert set(read) == {"observed"}, read  # nothing else was sent
        observed = read["observed"]
        assert observed <= sent == production.calls
        assert status["envoy_tap"]["sessions"]["flushed"] >= observed // 50  # batches of 50
        route = status["routes"][0]
        assert route["calls"] == {"OK": observed}
        assert route["drift"]["decode_errors"] == {}
        assert len(route["drift"]["history"]) >= 1  # windows of 100 after the 100-call reference

        samples = await asyncio.to_thread(scrape, observer.admin_port)
        served = (("grpc_code", "OK"), ("role", "primary"), ("route", "iris"), ("upstream", "production"))
        assert samples[("mlmirror_requests_total", served)] == observed  # the cluster Envoy said answered
        latency = (("role", "primary"), ("route", "iris"), ("upstream", "production"))
        assert samples[("mlmirror_request_duration_seconds_count", latency)] == observed
        assert 0 < samples[("mlmirror_request_duration_seconds_sum", latency)] < observed * WAIT
        assert samples[("mlmirror_envoy_tap_traces_total", (("outcome", "observed"),))] == observed
        assert samples[("mlmirror_envoy_tap_attached", ())] in (0, 1)


async def test_a_call_larger_than_the_limit_is_counted_too_large_and_not_decoded(tmp_path):
    rng = np.random.default_rng(12)
    admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(tap_observer(production, admin, batch=5, max_size="1KiB")) as observer,
        tapped_dataplane(tmp_path, production.port, shadow.port, admin) as channel,
    ):
        await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached")
        infer = channel.unary_unary(MODEL_INFER)
        for _ in range(200):
            if outcomes(observer).get("too_large", 0) >= 5:
                break
            await infer(infer_request(sample_features(rng, 100)), timeout=10)  # 100 rows: 1.6 KB of features
            await asyncio.sleep(0.02)
        read = outcomes(observer)
        assert set(read) == {"too_large"}, read
        assert read["too_large"] >= 5
        assert observer.status()["routes"][0]["drift"]["calls"] == 0


def attach_raw(admin: int, max_traces: int) -> socket.socket:
    """A reader that attaches to Envoy's tap (every call, batches of ``max_traces``) and reads nothing yet."""
    body = (
        b'{"config_id": "mlmirror", "tap_config": {"match": {"any_match": true}, "output_config": {"sinks": '
        b'[{"format": "PROTO_BINARY_LENGTH_DELIMITED", "buffered_admin": {"max_traces": %d}}]}}}' % max_traces
    )
    hung = socket.create_connection(("127.0.0.1", admin))
    hung.sendall(b"POST /tap HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return hung


def whole_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of a chunked response read to its last chunk."""
    sock.settimeout(WAIT)
    data = b""
    while b"\r\n0\r\n\r\n" not in data:
        more = sock.recv(1 << 16)
        assert more, f"the response ended early: {data[:200]!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return head, body
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]


async def test_no_observer_or_a_hung_one_holds_no_call_and_a_second_reader_is_refused(tmp_path):
    rng = np.random.default_rng(13)
    admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        tapped_dataplane(tmp_path, production.port, shadow.port, admin) as channel,
    ):
        await send(channel, rng, 100)  # nobody attached: Envoy taps nothing and serves
        hung = await asyncio.to_thread(attach_raw, admin, 10_000)  # attached, and it never reads
        try:
            async with running_proxy(tap_observer(production, admin)) as observer:
                await wait_until(lambda: observer.status()["envoy_tap"]["sessions"].get("refused", 0) >= 1, WAIT,
                                 "the second reader refused")  # fmt: skip
                latencies = await send(channel, rng, 300)  # each answered OK, or send() raises
                assert len(latencies) == 300
                tap = observer.status()["envoy_tap"]
                assert not tap["attached"]
                assert "already exists" in tap["problem"], tap
                assert tap["calls"] == {}
                hung.close()  # the hung reader goes: the observer attaches and reads
                await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached")
                await send_until(channel, rng, lambda: outcomes(observer).get("observed", 0) >= 50, "50 calls read")
                assert observer.status()["envoy_tap"]["problem"] == ""
        finally:
            hung.close()
        assert production.calls >= 450


async def test_envoy_keeps_one_batch_for_a_reader_that_does_not_read_and_then_taps_nothing(tmp_path):
    rng = np.random.default_rng(15)
    admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        tapped_dataplane(tmp_path, production.port, shadow.port, admin) as channel,
    ):
        stalled = await asyncio.to_thread(attach_raw, admin, 5)
        try:
            await send(channel, rng, 200)  # all answered while the reader reads nothing
            head, body = await asyncio.to_thread(whole_response, stalled)
        finally:
            stalled.close()
        assert head.startswith(b"HTTP/1.1 200")
        traces = list(TraceStream(1 << 20).feed(body))
        assert len(traces) == 5  # the batch, and nothing after it: Envoy held no more for the stalled reader
        assert production.calls == 200


async def test_the_reader_waits_for_envoy_and_attaches_once_it_runs(tmp_path):
    rng = np.random.default_rng(14)
    admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(tap_observer(production, admin)) as observer,
    ):
        await wait_until(lambda: observer.status()["envoy_tap"]["sessions"].get("failed", 0) >= 1, WAIT,
                         "a failed attempt")  # fmt: skip
        assert "ConnectionRefusedError" in observer.status()["envoy_tap"]["problem"]
        assert observer.readiness()[0]  # the observer is ready: Envoy carries the calls, not it
        async with tapped_dataplane(tmp_path, production.port, shadow.port, admin) as channel:
            await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached")
            await send_until(channel, rng, lambda: outcomes(observer).get("observed", 0) >= 50, "50 calls read")


@pytest.mark.slow
async def test_serve_reads_the_tap_in_its_observing_process_and_a_killed_one_starts_reading_again(tmp_path):
    """``mlmirror serve`` (supervisor, worker, observing process): the observing process reads the tap, /status and
    /metrics show it through the supervisor, and once it is SIGKILLed and restarted it reads again; Envoy answers
    every call meanwhile."""
    rng = np.random.default_rng(16)
    admin, envoy_admin = free_port(), free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        tapped_dataplane(tmp_path, production.port, shadow.port, envoy_admin) as channel,
    ):
        config = tmp_path / "observer.yaml"
        config.write_text(f"listen: 127.0.0.1:{free_port()}\nadmin: 127.0.0.1:{admin}\n"
                          + textwrap.dedent(tap_observer(production, envoy_admin)))  # fmt: skip
        async with process_group(config, admin, tmp_path / "serve.log", workers=1):

            def tap() -> dict:
                return status_of(admin).get("envoy_tap", {})

            await polled(tap, lambda t: bool(t.get("attached")), "the observing process attached")
            await send_until(channel, rng, lambda: tap()["calls"].get("observed", 0) >= 100, "100 calls read")
            status = status_of(admin)
            assert status["routes"][0]["calls"]["OK"] >= 100  # the observing process's own counts
            metrics = await admin_get(admin, "/metrics")
            assert 'mlmirror_envoy_tap_traces_total{outcome="observed"}' in metrics

            observer = status["observer"]["pid"]
            os.kill(observer, signal.SIGKILL)
            latencies = await send(channel, rng, 200)  # Envoy answers every one with the observer gone
            assert len(latencies) == 200
            await polled(lambda: status_of(admin), lambda s: s["observer"]["up"] and s["observer"]["pid"] != observer,
                         "the observing process restarted")  # fmt: skip
            await polled(tap, lambda t: bool(t.get("attached")), "the new observing process attached")
            await send_until(channel, rng, lambda: tap()["calls"].get("observed", 0) >= 50, "50 calls read again")


@pytest.mark.slow
async def test_a_hung_envoy_is_given_up_after_the_batch_is_late_and_read_again_once_it_runs(tmp_path):
    rng = np.random.default_rng(17)
    admin, listen = free_port(), free_port()
    async with FunctionModel(iris_outputs) as production, FunctionModel(iris_outputs) as shadow:
        config = on_ports(load(DATAPLANE_TAP), listen, admin, {"production": [production.port],
                                                               "shadow": [shadow.port]})  # fmt: skip
        async with (
            running_proxy(tap_observer(production, admin)) as observer,
            envoy_running(config, tmp_path) as envoy,
            grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel,
        ):
            await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached")
            envoy.send_signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: observer.status()["envoy_tap"]["problem"].startswith("TimeoutError"),
                                 WAIT, "the stalled batch given up")  # fmt: skip
                assert observer.status()["envoy_tap"]["sessions"]["failed"] >= 1
            finally:
                envoy.send_signal(signal.SIGCONT)
            await wait_until(lambda: observer.status()["envoy_tap"]["attached"], WAIT, "the tap attached again")
            await send_until(channel, rng, lambda: outcomes(observer).get("observed", 0) >= 50, "50 calls read")
            assert observer.status()["envoy_tap"]["problem"] == ""

"""The workers' hand-off to the hub (proxy/handoff/transport.py) over a real Unix socket, and the merged /metrics
(proxy/admin/metrics_merge.py) checked against sums by hand and by promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlmirror.admin.metrics_merge import merge_expositions
from mlmirror.handoff.tap import CallRecord
from mlmirror.handoff.transport import HandoffReceiver, HandoffSender, pack, unpack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until


def record(i: int = 0, response: bytes | None = b"answer", code: grpc.StatusCode = grpc.StatusCode.OK) -> CallRecord:
    return CallRecord(
        route="iris", method="/inference.GRPCInferenceService/ModelInfer", request=b"q" * i, response=response,
        code=code, served_by="production", role="primary", request_id=f"id-{i}",
        metadata=(("x-mlmirror-request-id", f"id-{i}"), ("trace-bin", b"\x00\xff")), started=1.5 + i, latency=0.25,
        upstream_latency=0.125,
    )  # fmt: skip


@given(
    request=st.binary(max_size=64),
    response=st.none() | st.binary(max_size=64),
    code=st.sampled_from(list(grpc.StatusCode)),
    metadata=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8) | st.binary(max_size=8)), max_size=4),
)
def test_records_survive_packing(request, response, code, metadata):
    original = record(0, response, code)
    original = CallRecord(**{**{f: getattr(original, f) for f in CallRecord.__slots__}, "request": request,
                             "metadata": tuple(metadata)})  # fmt: skip
    import marshal

    assert unpack(marshal.loads(marshal.dumps(pack(original)))) == original


def test_metadata_as_grpc_gives_it_is_packed_as_plain_pairs():
    from collections import namedtuple

    Metadatum = namedtuple("Metadatum", ["key", "value"])  # what grpc.aio's invocation_metadata() holds
    import marshal

    fields = {f: getattr(record(1), f) for f in CallRecord.__slots__}
    original = CallRecord(**{**fields, "metadata": (Metadatum("x-tenant", "acme"), Metadatum("t-bin", b"\x01"))})
    packed = marshal.loads(marshal.dumps(pack(original)))
    assert unpack(packed).metadata == (("x-tenant", "acme"), ("t-bin", b"\x01"))


def dropped_counter() -> Counter:
    return Counter("dropped", "test", ["reason"], registry=CollectorRegistry())


def drops(counter: Counter) -> dict[str, float]:
    return {s.labels["reason"]: s.value for s in next(iter(counter.collect())).samples if s.name.endswith("_total")}


async def test_records_reach_the_hub_in_order_with_the_hello_first(tmp_path):
    delivered: list[CallRecord] = []
    hellos: list[dict] = []
    received = Counter("received", "test", ["worker"], registry=CollectorRegistry())
    receiver = HandoffReceiver(tmp_path / "h.sock", delivered.append, hellos.append, received)
    await receiver.start()
    counter = dropped_counter()
    sender = HandoffSender(tmp_path / "h.sock", counter)
    try:
        sender.offer(record(0))  # before connecting: nowhere to go
        await asyncio.sleep(0)
        assert drops(counter)["disconnected"] == 1
        await sender.connect()
        sender.hello(index=3, pid=42, admin_port=9)
        for i in range(1, 501):
            sender.offer(record(i))
            if i % 100 == 0:
                await asyncio.sleep(0)  # a new loop iteration: a new batch
        await wait_until(lambda: len(delivered) == 500, what="500 records at the hub")
        assert hellos == [{"index": 3, "pid": 42, "admin_port": 9}]
        assert delivered == [record(i) for i in range(1, 501)]
        assert sender.sent == 500
        assert next(iter(received.collect())).samples[0].labels == {"worker": "3"}
    finally:
        await sender.close()
        await receiver.close()


async def test_a_hub_that_does_not_read_costs_counted_drops_not_waits(tmp_path):
    done = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()

    server = await asyncio.start_unix_server(never_read, str(tmp_path / "h.sock"))
    counter = dropped_counter()
    sender = HandoffSender(tmp_path / "h.sock", counter, max_batch=50, high_water=64 * 1024)
    await sender.connect()
    try:
        offered = 0
        started = asyncio.get_running_loop().time()
        for _ in range(400):
            for i in range(60):  # 10 over max_batch each iteration
                sender.offer(record(4096 + i))
                offered += 1
            await asyncio.sleep(0)
        assert asyncio.get_running_loop().time() - started < 5.0  # never waited for the hub
        counts = drops(counter)
        assert counts["queue_full"] == 400 * 10
        assert counts["backpressure"] > 0
        assert sender.sent + counts["queue_full"] + counts["backpressure"] == offered
    finally:
        done.set()
        server.close()
        await sender.close()


async def test_the_hub_closes_a_connection_that_sends_garbage_and_keeps_serving(tmp_path):
    delivered: list[CallRecord] = []
    receiver = HandoffReceiver(tmp_path / "h.sock", delivered.append, lambda hello: None,
                               Counter("r", "t", ["worker"], registry=CollectorRegistry()))  # fmt: skip
    await receiver.start()
    try:
        for garbage in (b"\x00\x00\x00\x05junk!", (2**31).to_bytes(4, "big")):
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "h.sock"))
            writer.write(garbage)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the hub
            writer.close()
        sender = HandoffSender(tmp_path / "h.sock", dropped_counter())
        await sender.connect()
        sender.offer(record(1))
        await wait_until(lambda: delivered == [record(1)], what="a good worker's record")
        await sender.close()
    finally:
        await receiver.close()


def exposition(calls: float, inflight: float, lag: float, buckets: list[float]) -> str:
    registry = CollectorRegistry()
    Counter("mlmirror_calls", "calls", ["route"], registry=registry).labels("iris").inc(calls)
    Gauge("mlmirror_inflight_calls", "in flight", registry=registry).set(inflight)
    Gauge("mlmirror_event_loop_lag_seconds", "lag", registry=registry).set(lag)
    histogram = Histogram("mlmirror_latency_seconds", "latency", buckets=(0.1, 1.0), registry=registry)
    for value in buckets:
        histogram.observe(value)
    return generate_latest(registry).decode()


@pytest.mark.process
def test_merged_metrics_sum_counters_and_histograms_and_keep_each_processs_gauges():
    workers = {"0": exposition(10, 2, 0.001, [0.05, 0.5]), "1": exposition(5, 3, 0.002, [2.0])}
    hub_registry = CollectorRegistry()
    Gauge("mlmirror_drift_score", "only the hub", ["series"], registry=hub_registry).labels("x").set(0.7)
    Gauge("mlmirror_event_loop_lag_seconds", "lag", registry=hub_registry).set(0.003)
    merged = merge_expositions(generate_latest(hub_registry).decode(), workers).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(merged) for s in family.samples}  # fmt: skip
    assert samples[("mlmirror_calls_total", (("route", "iris"),))] == 15
    assert samples[("mlmirror_inflight_calls", ())] == 5
    assert samples[("mlmirror_latency_seconds_bucket", (("le", "0.1"),))] == 1
    assert samples[("mlmirror_latency_seconds_bucket", (("le", "1.0"),))] == 2
    assert samples[("mlmirror_latency_seconds_count", ())] == 3
    assert samples[("mlmirror_latency_seconds_sum", ())] == pytest.approx(2.55)
    lags = {dict(labels)["worker"]: v for (name, labels), v in samples.items()
            if name == "mlmirror_event_loop_lag_seconds"}  # fmt: skip
    assert lags == {"0": 0.001, "1": 0.002, "hub": 0.003}
    assert samples[("mlmirror_drift_score", (("series", "x"),))] == 0.7  # the hub's own: unchanged, no label
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian package prometheus) is needed; .ci/run installs it"
    checked = subprocess.run([promtool, "check", "metrics"], input=merged, capture_output=True, text=True,
                             check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr

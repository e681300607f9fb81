"""The workers' hand-off to the hub (proxy/handoff/transport.py) over a real Unix socket, and the merged /metrics
(proxy/admin/metrics_merge.py) checked against sums by hand and by promtool."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import sys

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmirror.admin.metrics_merge import merge_expositions
from mlmirror.config import parse_config
from mlmirror.handoff.frames import BATCH, HELLO, FrameError, decode_batch, decode_hello, encode_batch
from mlmirror.handoff.tap import CallRecord
from mlmirror.handoff.transport import HandoffReceiver, HandoffSender, handoff_percent
from mlmirror.serving.sampling import sampled
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, wait_until


def record(i: int = 0, response: bytes | None = b"answer", code: grpc.StatusCode = grpc.StatusCode.OK) -> CallRecord:
    return CallRecord(
        route="iris", method="/inference.GRPCInferenceService/ModelInfer", request=b"q" * i, response=response,
        code=code, served_by="production", role="primary", request_id=f"id-{i}",
        metadata=(("x-mlmirror-request-id", f"id-{i}"), ("trace-bin", b"\x00\xff")), started=1.5 + i, latency=0.25,
        upstream_latency=0.125,
    )  # fmt: skip


METADATA_VALUES = st.text(max_size=8) | st.binary(max_size=8)
DETERMINISTIC = settings(derandomize=True, max_examples=200, deadline=None)


@DETERMINISTIC
@given(
    request=st.binary(max_size=64),
    response=st.none() | st.binary(max_size=64),
    code=st.sampled_from(list(grpc.StatusCode)),
    metadata=st.lists(st.tuples(st.text(max_size=8), METADATA_VALUES), max_size=4),
    request_id=st.text(max_size=20),
    names=st.tuples(st.text(max_size=10), st.text(max_size=10)),
    timings=st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False), st.floats(allow_nan=False)),
)
def test_records_survive_a_batch_frame(request, response, code, metadata, request_id, names, timings):
    fields = {f: getattr(record(0, response, code), f) for f in CallRecord.__slots__}
    original = CallRecord(**{**fields, "request": request, "metadata": tuple(metadata), "request_id": request_id,
                             "route": names[0], "served_by": names[1], "started": timings[0], "latency": timings[1],
                             "upstream_latency": timings[2]})  # fmt: skip
    frame, count, skipped = encode_batch([original, record(1)])
    assert (count, skipped) == (2, 0)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert frame[4:5] == BATCH
    assert decode_batch(frame[5:]) == [original, record(1)]


def test_a_nan_latency_survives_a_batch_frame():
    fields = {f: getattr(record(1), f) for f in CallRecord.__slots__}
    frame, _, _ = encode_batch([CallRecord(**{**fields, "upstream_latency": math.nan})])
    assert math.isnan(decode_batch(frame[5:])[0].upstream_latency)


def test_metadata_as_grpc_gives_it_is_carried_as_plain_pairs():
    from collections import namedtuple

    Metadatum = namedtuple("Metadatum", ["key", "value"])  # what grpc.aio's invocation_metadata() holds
    fields = {f: getattr(record(1), f) for f in CallRecord.__slots__}
    original = CallRecord(**{**fields, "metadata": (Metadatum("x-tenant", "acme"), Metadatum("t-bin", b"\x01"))})
    frame, _, _ = encode_batch([original])
    assert decode_batch(frame[5:])[0].metadata == (("x-tenant", "acme"), ("t-bin", b"\x01"))


def test_a_record_the_format_cannot_carry_is_left_out_not_raised():
    fields = {f: getattr(record(1), f) for f in CallRecord.__slots__}
    bad = [CallRecord(**{**fields, "route": "r" * 70_000}), CallRecord(**{**fields, "metadata": (("k", 5),)})]
    frame, count, skipped = encode_batch([record(0), *bad, record(2)])
    assert (count, skipped) == (2, 2)
    assert decode_batch(frame[5:]) == [record(0), record(2)]


def good_batch(n: int = 3) -> bytes:
    """The payload (after the kind byte) of a batch of ``n`` records."""
    return encode_batch([record(i) for i in range(n)])[0][5:]


@DETERMINISTIC
@given(cut=st.integers(0, len(good_batch()) - 1))
def test_a_truncated_batch_gives_the_records_before_the_cut(cut):
    payload = good_batch()
    with pytest.raises(FrameError) as caught:
        decode_batch(payload[:cut])
    whole = [record(i) for i in range(3)]
    assert caught.value.records == whole[: len(caught.value.records)]
    assert len(caught.value.records) + caught.value.lost >= 3 or cut < 4


@DETERMINISTIC
@given(garbage=st.binary(max_size=400))
def test_garbage_never_raises_anything_but_a_frame_error(garbage):
    try:
        records, lost = decode_batch(garbage), 0
    except FrameError as exc:
        records, lost = exc.records, exc.lost
        assert lost >= 1
    assert all(isinstance(r, CallRecord) for r in records)
    with contextlib.suppress(FrameError):
        assert isinstance(decode_hello(garbage), dict)


@DETERMINISTIC
@given(at=st.integers(0, len(good_batch()) - 1), byte=st.integers(0, 255))
def test_a_flipped_byte_gives_records_or_a_frame_error(at, byte):
    payload = bytearray(good_batch())
    payload[at] = byte
    try:
        records = decode_batch(bytes(payload))
    except FrameError as exc:
        records = exc.records
    assert all(isinstance(r, CallRecord) for r in records)
    assert len(records) <= int.from_bytes(payload[:4], "little")


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
        await wait_until(lambda: drops(counter)["disconnected"] == 1, what="the drop, once the linger is over")
        await sender.connect()
        sender.hello(index=3, pid=42, admin_port=9)
        for i in range(1, 501):
            sender.offer(record(i))
            if i % 100 == 0:
                await asyncio.sleep(0.02)  # past the linger: a new batch
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
            for i in range(60):  # a full batch written at once each iteration, 10 more gathered
                sender.offer(record(4096 + i))
                offered += 1
            await asyncio.sleep(0)
        sender.flush()
        assert asyncio.get_running_loop().time() - started < 5.0  # never waited for the hub
        counts = drops(counter)
        assert counts["backpressure"] > 0
        assert sender.sent + counts["backpressure"] == offered
        assert set(counts) == {"backpressure", "disconnected", "unserializable"}
    finally:
        done.set()
        server.close()
        await sender.close()


async def test_a_worker_writes_a_frame_per_full_batch_or_per_linger_not_per_loop_iteration(tmp_path):
    frames: list[list[CallRecord]] = []

    async def read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                frame = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
                frames.append(decode_batch(memoryview(frame)[1:]))
        writer.close()

    server = await asyncio.start_unix_server(read, str(tmp_path / "h.sock"))
    slow = HandoffSender(tmp_path / "h.sock", dropped_counter(), max_batch=8, linger=3600.0)
    quick = HandoffSender(tmp_path / "h.sock", dropped_counter(), linger=0.01)
    await slow.connect()
    await quick.connect()
    try:
        for i in range(7):
            slow.offer(record(i))
            await asyncio.sleep(0)  # seven loop iterations, well within the linger: nothing written yet
        assert slow.sent == 0
        slow.offer(record(7))  # the eighth fills the batch: written at once
        assert slow.sent == 8
        await wait_until(lambda: len(frames) == 1, what="the full batch")
        assert frames[0] == [record(i) for i in range(8)]
        slow.offer(record(8))
        quick.offer(record(9))  # alone: the linger's timer writes it
        await wait_until(lambda: len(frames) == 2, what="the quick sender's lone record")
        assert frames[1] == [record(9)]
        assert slow.sent == 8
        await slow.close()  # closing writes what is gathered
        await wait_until(lambda: len(frames) == 3, what="the record gathered at close")
        assert frames[2] == [record(8)]
    finally:
        await quick.close()
        server.close()


async def hub(tmp_path, delivered: list[CallRecord]) -> tuple[HandoffReceiver, Counter]:
    malformed = Counter("malformed", "test", ["worker"], registry=CollectorRegistry())
    receiver = HandoffReceiver(tmp_path / "h.sock", delivered.append, lambda hello: None,
                               Counter("r", "t", ["worker"], registry=CollectorRegistry()), malformed)  # fmt: skip
    await receiver.start()
    return receiver, malformed


def framed(kind: bytes, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + kind + payload


async def test_a_damaged_frame_is_counted_and_the_next_one_read(tmp_path):
    delivered: list[CallRecord] = []
    receiver, malformed = await hub(tmp_path, delivered)
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "h.sock"))
        cut = good_batch(3)[:-7]  # the third record truncated
        writer.write(framed(HELLO, b'{"index": 2}') + framed(BATCH, cut) + framed(b"Z", b"?") + framed(HELLO, b"[1]"))
        writer.write(framed(BATCH, b"\x01\x00") + framed(BATCH, good_batch(1)))
        await wait_until(lambda: len(delivered) == 3, what="the intact records")
        assert delivered == [record(0), record(1), record(0)]
        assert receiver.malformed == 4  # the cut batch, the unknown kind, the list hello, the batch without a count
        assert malformed.labels("2")._value.get() == 4
        writer.close()
    finally:
        await receiver.close()


async def test_an_impossible_length_closes_the_connection_and_the_hub_keeps_serving(tmp_path):
    delivered: list[CallRecord] = []
    receiver, _ = await hub(tmp_path, delivered)
    try:
        for garbage in ((2**31).to_bytes(4, "big"), b"\x00\x00\x00\x00"):
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "h.sock"))
            writer.write(garbage)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the hub
            writer.close()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "h.sock"))
        writer.write(framed(BATCH, good_batch(2))[:-3])  # half a frame, then gone
        writer.close()
        sender = HandoffSender(tmp_path / "h.sock", dropped_counter())
        await sender.connect()
        sender.offer(record(1))
        await wait_until(lambda: delivered == [record(1)], what="a good worker's record")
        assert receiver.malformed == 2
        await sender.close()
    finally:
        await receiver.close()


ROUTE = """
upstreams: {{production: 127.0.0.1:1, candidate: 127.0.0.1:2}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
{extra}
"""


@pytest.mark.parametrize(
    ("extra", "percent"),
    [
        ("    shadows: [{name: c, upstream: candidate, percent: 10}]\n    drift: {percent: 30}", 30.0),
        ("    shadows: [{name: c, upstream: candidate, percent: 10}]", 10.0),
        ("    drift: {percent: 100}", 100.0),
        ("    capture: {path: caps, percent: 2.5}", 2.5),
        ("", 0.0),
    ],
)
def test_the_door_takes_the_largest_share_any_consumer_wants(extra, percent, tmp_path):
    route = parse_config(ROUTE.format(extra=extra), str(tmp_path / "c.yaml")).routes[0]
    assert handoff_percent(route) == percent


async def test_calls_no_consumer_samples_never_cross_the_door(tmp_path):
    delivered: list[CallRecord] = []
    receiver, _ = await hub(tmp_path, delivered)
    route = parse_config(ROUTE.format(extra="    drift: {percent: 30}")).routes[0]
    sender = HandoffSender(tmp_path / "h.sock", dropped_counter())
    await sender.connect()
    try:
        door = sender.door(route)
        records = [record(i) for i in range(1000)]
        for each in records:
            door.offer(each)
        wanted = [r for r in records if sampled(r.request_id, 30.0)]
        assert 200 < len(wanted) < 400
        await wait_until(lambda: len(delivered) == len(wanted), what="the sampled calls")
        await asyncio.sleep(0.05)
        assert delivered == wanted
        assert sender.sent == len(wanted)
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.process  # runs the benchmark script
def test_bench_door_prints_the_serving_side_cost_of_both_formats():
    done = subprocess.run([sys.executable, "-m", "loadtest.bench_door", "--calls", "400", "--repeat", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert set(rows) >= {"before", "after", "after, sampled 10%"}
    assert math.isfinite(float(rows["after"][0].split(" ")[0]))  # µs per handed-off call (noise may make it < 0)


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

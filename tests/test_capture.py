"""Capture: sampled calls written as JSON lines to rotating files, bounded on disk, read back into profiles."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import Capture, parse_config
from mlmirror.errors import ConfigError
from mlmirror.observing.capture.record import captured_inputs, encode_record
from mlmirror.observing.capture.rotating import RotatingFiles, TooLargeError
from mlmirror.observing.capture.writer import CaptureWriter
from mlmirror.observing.drift.profile_build import build_profile
from mlmirror.observing.drift.reference import Reference
from mlmirror.protos import inference_pb2
from mlmirror.serving.sampling import sampled
from prometheus_client import generate_latest

from tests.support import ECHO, REPO, EchoServer, FunctionModel, fp64_call, through_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(x: np.ndarray, request_id: str) -> bytes:
    """A ModelInfer request for model "m" with the FP32 input "input" holding ``x`` (raw contents)."""
    request = inference_pb2.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request.SerializeToString()


def doubled(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    return [("y", "FP32", (2 * x).astype("<f4"))]


def lines(directory: Path) -> list[dict]:
    """Every record in a capture directory, oldest file first."""
    return [json.loads(line) for file in sorted(directory.glob("*.jsonl")) for line in file.read_text().splitlines()]


def capture_config(port: int, directory: Path, capture: str = "{}") -> str:
    return f"""
    mirror_shed_lag: off
    upstreams: {{model: 127.0.0.1:{port}}}
    routes:
      - name: m
        match: {{}}
        primary: model
        capture: {{path: {directory}, {capture.strip("{}")}}}
    """


def capture_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("capture:")]


async def send_all(channel: grpc.aio.Channel, requests: list[bytes]) -> list[bytes]:
    infer = channel.unary_unary(MODEL_INFER)
    return [await infer(request, timeout=10) for request in requests]


# --- configuration ----------------------------------------------------------------------------------------------


def test_capture_keys_read_back_with_their_defaults(tmp_path: Path):
    base = "upstreams: {a: 127.0.0.1:1}\nroutes:\n  - match: {}\n    primary: a\n"
    spec = parse_config(base + "    capture: {path: caps}\n", str(tmp_path / "conf.yaml")).routes[0].capture
    assert spec == Capture(path=str(tmp_path / "caps"))
    assert (spec.percent, spec.include, spec.tensors, spec.max_file_bytes, spec.max_files, spec.queue_size) == (
        100.0, "both", True, 64 * 2**20, 10, 1000
    )  # fmt: skip
    given = "    capture: {path: /c, percent: 2.5, include: request, tensors: false, max_file_bytes: 1MiB, " \
            "max_files: 3, queue_size: 7}\n"  # fmt: skip
    spec = parse_config(base + given).routes[0].capture
    assert spec == Capture(
        path="/c", percent=2.5, include="request", tensors=False, max_file_bytes=2**20, max_files=3, queue_size=7
    )


@pytest.mark.parametrize(
    ("capture", "line", "key", "words"),
    [
        ("{percent: 5}", 5, "routes[0].capture", "missing required key 'path'"),
        ("{path: c, include: all}", 5, "routes[0].capture.include", "unknown include 'all' (one of request, response"),
        ("{path: c, max_file_bytes: 1KiB}", 5, "routes[0].capture.max_file_bytes", "must be >= 4096"),
        ("{path: c, max_files: 0}", 5, "routes[0].capture.max_files", "must be >= 1"),
        ("{path: c, percent: 101}", 5, "routes[0].capture.percent", "must be <= 100"),
        ("{path: c, queue: 3}", 5, "routes[0].capture.queue", "unknown key (did you mean 'queue_size'?)"),
        ("{path: conf.yaml}", 5, "routes[0].capture.path", "not a directory"),
    ],
)
def test_capture_config_errors_name_file_line_and_key(tmp_path: Path, capture: str, line: int, key: str, words: str):
    file = tmp_path / "conf.yaml"
    file.write_text("")
    text = f"upstreams: {{a: 127.0.0.1:1}}\nroutes:\n  - match: {{}}\n    primary: a\n    capture: {capture}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, str(file))
    assert f"{file}:{line}: {key}: {words}" in str(caught.value)


def test_two_routes_may_not_capture_into_one_directory():
    text = textwrap.dedent("""\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - {match: {model: x}, primary: a, capture: {path: /tmp/c}}
          - match: {}
            primary: a
            capture:
              path: /tmp/c
        """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "conf.yaml")
    assert "conf.yaml:7: routes[1].capture.path: capture directory /tmp/c is also route x's" in str(caught.value)


# --- rotation -----------------------------------------------------------------------------------------------------


def test_rotation_keeps_at_most_max_files_of_at_most_max_file_bytes(tmp_path: Path):
    files = RotatingFiles(tmp_path, "capture", max_file_bytes=1000, max_files=3)
    written = [f"{i:05d}".encode() + b"x" * 94 + b"\n" for i in range(95)]  # 100 bytes each: 10 per file
    for line in written:
        files.write(line)
        on_disk = list(tmp_path.iterdir())
        assert len(on_disk) <= 3
        assert all(p.stat().st_size <= 1000 for p in on_disk)
    files.close()
    kept = files.files()
    assert len(kept) == 3
    assert sum(p.stat().st_size for p in kept) == files.disk_bytes == 2500  # 10 + 10 + 5 lines
    assert (files.files_started, files.files_deleted, files.bytes_written) == (10, 7, 9500)
    text = b"".join(p.read_bytes() for p in kept)
    assert text == b"".join(written[70:])  # the newest lines, in order: the oldest files went first
    with pytest.raises(TooLargeError):
        files.write(b"y" * 1001)


def test_files_left_by_an_earlier_run_count_towards_max_files(tmp_path: Path):
    old = tmp_path / "capture-20000101T000000.000000Z-000001.jsonl"
    old.write_text('{"old": 1}\n')
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    files = RotatingFiles(tmp_path, "capture", max_file_bytes=4096, max_files=1)
    files.write(b"{}\n")
    files.close()
    assert not old.exists()  # the oldest capture file made room
    assert other.exists()
    assert len(files.files()) == 1


# --- the writer -----------------------------------------------------------------------------------------------------


def test_a_full_queue_drops_and_counts_then_stop_writes_what_was_queued(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path), queue_size=3))
    for i in range(5):
        writer.offer(fp64_call(np.full((1, 2), float(i))))
    assert (writer.queued, writer.stats.drops["queue_full"]) == (3, 2)
    writer.start()
    writer.stop()
    assert not writer.alive
    assert [r["inputs"][0]["data"] for r in lines(tmp_path)] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert writer.stats.records == 3
    writer.offer(fp64_call(np.ones((1, 2))))
    assert writer.stats.drops["closed"] == 1


def test_a_record_larger_than_a_file_and_a_disk_that_refuses_are_counted(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path), max_file_bytes=4096))
    writer.offer(fp64_call(np.ones((1000, 2))))  # ~ 2000 numbers: more than 4096 bytes of JSON
    writer.offer(fp64_call(np.ones((1, 2))))
    writer.start()
    writer.stop()
    assert writer.stats.drops["too_large"] == 1
    assert writer.stats.records == 1

    gone = tmp_path / "gone"
    writer = CaptureWriter("m", Capture(path=str(gone)))  # the directory is missing: every write fails
    writer.offer(fp64_call(np.ones((1, 2))))
    writer.start()
    writer.stop()
    assert (writer.stats.records, writer.stats.drops["write_error"]) == (0, 1)


def test_records_hold_the_call_its_bytes_and_its_tensors_as_lists():
    call = fp64_call(np.array([[1.5, np.nan], [np.inf, -np.inf]]), [("p", np.array([0.25, 0.75]))])
    entry = json.loads(encode_record(call, Capture(path="/c")))
    assert {k: entry[k] for k in ("route", "method", "code", "served_by", "role", "model_name", "model_version")} == {
        "route": "m", "method": MODEL_INFER, "code": "OK", "served_by": "p", "role": "primary", "model_name": "m",
        "model_version": "1",
    }  # fmt: skip
    assert base64.b64decode(entry["request"]) == call.request
    assert base64.b64decode(entry["response"]) == call.response
    assert entry["inputs"] == [
        {"name": "input", "datatype": "FP64", "shape": [2, 2], "data": [1.5, "NaN", "Infinity", "-Infinity"]}
    ]
    assert entry["outputs"] == [{"name": "p", "datatype": "FP64", "shape": [2], "data": [0.25, 0.75]}]
    only_request = json.loads(encode_record(call, Capture(path="/c", include="request", tensors=False)))
    assert "request" in only_request
    assert not {"response", "inputs", "outputs"} & set(only_request)
    only_response = json.loads(encode_record(call, Capture(path="/c", include="response")))
    assert "outputs" in only_response
    assert not {"request", "inputs"} & set(only_response)


def test_bytes_tensors_are_text_or_base64_and_read_back_as_bytes(tmp_path: Path):
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"red", b"blue"])
    request.inputs.add(name="blob", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"\xff", b"a"])
    call = dataclasses.replace(fp64_call(np.ones((1, 1))), request=request.SerializeToString())
    (tmp_path / "c.jsonl").write_bytes(encode_record(call, Capture(path=str(tmp_path))))
    entry = lines(tmp_path)[0]
    assert entry["inputs"][0]["data"] == ["red", "blue"]
    assert (entry["inputs"][1]["encoding"], entry["inputs"][1]["data"]) == ("base64", ["/w==", "YQ=="])
    (text, values), (blob, raw) = captured_inputs(tmp_path / "c.jsonl")
    assert (text, values.tolist(), blob, raw.tolist()) == ("text", [b"red", b"blue"], "blob", [b"\xff", b"a"])


def test_bad_capture_files_are_clear_errors(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text('{"inputs": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not a capture record"):
        captured_inputs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no capture files"):
        captured_inputs(empty)
    (empty / "b.jsonl").write_text('{"method": "/test.Echo/Unary"}\n')
    with pytest.raises(ValueError, match="no captured ModelInfer inputs"):
        captured_inputs(empty)


# --- through the proxy ----------------------------------------------------------------------------------------------


async def test_sampled_calls_are_captured_with_the_call_and_its_tensors(tmp_path: Path):
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=(1, 3)).astype("<f4") for _ in range(200)]
    async with FunctionModel(doubled) as model:
        config = capture_config(model.port, tmp_path / "caps", "{percent: 30}")
        async with through_proxy(config) as (proxy, channel):
            await send_all(channel, [infer_request(x, f"call-{i}") for i, x in enumerate(rows)])
            await wait_until(lambda: proxy.status()["routes"][0]["capture"]["records"] >= 1, what="a record")
            await proxy.stop(grace=0)  # flushes
            status = proxy.status()["routes"][0]["capture"]
            metrics = generate_latest(proxy.metrics.registry).decode()  # the admin endpoint has stopped too
    records = lines(tmp_path / "caps")
    expected = [f"call-{i}" for i in range(200) if sampled(f"call-{i}", 30)]
    assert 40 < len(expected) < 80
    assert [r["request_id"] for r in records] == expected  # the same calls the hash samples everywhere
    first = records[0]
    i = int(first["request_id"].split("-")[1])
    assert (first["route"], first["method"], first["code"], first["role"]) == ("m", MODEL_INFER, "OK", "primary")
    assert (first["served_by"], first["model_name"], first["model_version"]) == ("model", "m", "1")
    assert 0 < first["upstream_latency"] <= first["latency"] < 10
    assert abs(first["time"] - records[-1]["time"]) < 60
    assert base64.b64decode(first["request"]) == infer_request(rows[i], first["request_id"])
    np.testing.assert_array_equal(np.array(first["inputs"][0]["data"], dtype="<f4"), rows[i].ravel())
    np.testing.assert_array_equal(np.array(first["outputs"][0]["data"], dtype="<f4"), 2 * rows[i].ravel())
    assert status["records"] == len(expected)
    assert status["dropped"]["queue_full"] == 0
    assert f'mlmirror_capture_records_total{{route="m"}} {float(len(expected))}' in metrics
    assert 'mlmirror_capture_dropped_total{reason="queue_full",route="m"} 0.0' in metrics
    assert not capture_threads()


async def test_disk_stays_bounded_under_traffic(tmp_path: Path):
    x = np.ones((4, 4), dtype="<f4")
    async with FunctionModel(doubled) as model:
        config = capture_config(model.port, tmp_path, "{max_file_bytes: 4KiB, max_files: 3}")
        async with through_proxy(config) as (proxy, channel):
            await send_all(channel, [infer_request(x, f"c{i}") for i in range(300)])
            await wait_until(lambda: proxy.status()["routes"][0]["capture"]["records"] == 300, what="300 records")
            status = proxy.status()["routes"][0]["capture"]
    files = sorted(tmp_path.glob("*.jsonl"))  # noqa: ASYNC240 - the proxy has stopped
    sizes = [f.stat().st_size for f in files]
    assert len(files) == 3
    assert max(sizes) <= 4096
    assert status["disk_bytes"] == sum(sizes) <= 3 * 4096
    assert status["bytes"] > 10 * 3 * 4096  # far more was written than is kept
    assert status["files_deleted"] == status["files"] - 3
    assert lines(tmp_path)[-1]["request_id"] == "c299"  # the newest are kept


async def test_errors_and_other_methods_are_captured_without_tensors(tmp_path: Path):
    async with EchoServer("echo") as echo:
        config = "method_types: {/test.Echo/Unary: unary_unary}\n" + textwrap.dedent(
            capture_config(echo.port, tmp_path)
        )
        async with through_proxy(config) as (proxy, channel):
            unary = channel.unary_unary(ECHO + "Unary")
            assert await unary(b"hello", timeout=5) == b"echo:hello"
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(b"boom", metadata=(("x-test-code", "INVALID_ARGUMENT"),), timeout=5)
            await wait_until(lambda: proxy.status()["routes"][0]["capture"]["records"] == 2, what="2 records")
    ok, failed = lines(tmp_path)
    assert (ok["code"], base64.b64decode(ok["request"]), base64.b64decode(ok["response"])) == (
        "OK", b"hello", b"echo:hello"
    )  # fmt: skip
    assert (failed["code"], failed["response"], failed["served_by"]) == ("INVALID_ARGUMENT", None, "model")
    assert not {"inputs", "outputs", "model_version"} & set(ok)


async def test_reload_and_stop_flush_and_join_the_writer(tmp_path: Path):
    x = np.ones((1, 2), dtype="<f4")
    async with FunctionModel(doubled) as model:
        file = tmp_path / "mlmirror.yaml"
        text = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n" + textwrap.dedent(
            capture_config(model.port, tmp_path / "caps")
        )
        async with through_proxy(text) as (proxy, channel):
            await send_all(channel, [infer_request(x, f"a{i}") for i in range(20)])
            file.write_text(text.replace("capture: {path:", "capture: {queue_size: 5000, path:"))
            assert await proxy.reload_from_file(str(file))  # a new writer: it waits for the old one
            await send_all(channel, [infer_request(x, f"b{i}") for i in range(20)])
            assert 1 <= len(capture_threads()) <= 2
            file.write_text(text.replace("capture:", "# capture:"))
            assert await proxy.reload_from_file(str(file))
            await wait_until(lambda: not capture_threads(), what="the writers to end once removed")
            assert proxy.status()["routes"][0]["capture"] is None
    ids = [r["request_id"] for r in lines(tmp_path / "caps")]
    assert ids == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]  # nothing lost, in order


async def test_a_capture_directory_that_cannot_be_created_refuses_the_start(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = capture_config(1, blocker / "caps")
    with pytest.raises(Exception, match=r"route m: cannot create capture directory .*/file/caps"):
        async with through_proxy(config):
            pass


# --- profiles from captures -----------------------------------------------------------------------------------------


@pytest.mark.process
async def test_a_profile_built_from_a_capture_equals_one_built_from_the_same_rows(tmp_path: Path):
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(int(rng.integers(1, 4)), 3)).astype("<f4") for _ in range(150)]
    async with (
        FunctionModel(doubled) as model,
        through_proxy(capture_config(model.port, tmp_path / "caps")) as (proxy, channel),
    ):
        await send_all(channel, [infer_request(x, f"r{i}") for i, x in enumerate(batches)])
        await wait_until(lambda: proxy.status()["routes"][0]["capture"]["records"] == 150, what="150 records")
    np.save(tmp_path / "rows.npy", np.concatenate(batches))
    from_capture = await asyncio.to_thread(
        build_profile, tmp_path / "caps", tmp_path / "a.npz", bins=8, model="m", version="1", input_name="input",
        names=None,
    )  # fmt: skip
    from_npy = await asyncio.to_thread(
        build_profile, tmp_path / "rows.npy", tmp_path / "b.npz", bins=8, model="m", version="1", input_name="input",
        names=None,
    )  # fmt: skip
    assert from_capture.schema.names() == from_npy.schema.names() == ["input[0]", "input[1]", "input[2]"]
    assert from_capture.counts.rows == from_npy.counts.rows == sum(len(b) for b in batches)
    np.testing.assert_array_equal(from_capture.edges, from_npy.edges)
    np.testing.assert_array_equal(from_capture.counts.numeric, from_npy.counts.numeric)

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mlmirror", "profile", "build", "--data", str(tmp_path / "caps"), "--out",
         str(tmp_path / "c.npz"), "--bins", "8"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{sum(len(b) for b in batches)} rows, 3 series (input[0], input[1], input[2]), 8 bins" in done.stdout
    np.testing.assert_array_equal(Reference.load(tmp_path / "c.npz").edges, from_npy.edges)

"""Outcome records in captures: outcomes reported for captured calls are appended to the capture, keyed by
request id, once per call; other outcomes are not written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import numpy as np
from mlmirror.config import Capture
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.capture.record import captured_inputs, encode_outcome
from mlmirror.observing.capture.writer import CaptureCollector, CaptureWriter
from mlmirror.observing.groundtruth.feedback import FeedbackService
from mlmirror.protos import inference_pb2
from prometheus_client import CollectorRegistry, generate_latest

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def call(request_id: str, x: np.ndarray | None = None) -> CallRecord:
    request = inference_pb2.ModelInferRequest(model_name="m", id=request_id)
    values = np.zeros((1, 2)) if x is None else x
    request.inputs.add(name="input", datatype="FP64", shape=list(values.shape))
    request.raw_input_contents.append(np.ascontiguousarray(values, dtype="<f8").tobytes())
    return CallRecord(
        route="m", method=MODEL_INFER, request=request.SerializeToString(), response=b"", code=grpc.StatusCode.OK,
        served_by="p", role="primary", request_id=request_id, metadata=(), started=1.0, latency=0.1,
        upstream_latency=0.1,
    )  # fmt: skip


def lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_an_outcome_record_is_one_json_line_with_non_finite_values_as_strings():
    line = encode_outcome("iris", "id-1", [1.5, math.nan, math.inf], ["a", "b"], 12.5)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {
        "record": "outcome", "time": 12.5, "route": "iris", "request_id": "id-1",
        "values": [1.5, "NaN", "Infinity"], "labels": ["a", "b"],
    }  # fmt: skip


def test_outcomes_of_captured_calls_are_appended_once_and_others_are_not(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path)))
    writer.offer(call("a"))
    writer.offer(call("b"))
    assert writer.offer_outcome("a", [], ["1"]) is True
    assert writer.offer_outcome("a", [], ["2"]) is False  # repeated: already queued
    assert writer.offer_outcome("never-captured", [], ["1"]) is False
    assert writer.offer_outcome("b", [2.5], []) is True
    writer.start()
    writer.stop()
    records = lines(tmp_path)
    assert [(r.get("record"), r["request_id"]) for r in records] == [
        (None, "a"), (None, "b"), ("outcome", "a"), ("outcome", "b")
    ]  # fmt: skip
    assert (records[2]["labels"], records[2]["values"], records[2]["route"]) == (["1"], [], "m")
    assert (records[3]["labels"], records[3]["values"]) == ([], [2.5])
    assert (writer.stats.records, writer.stats.outcomes) == (2, 2)
    assert writer.snapshot()["outcomes"] == 2
    registry = CollectorRegistry()
    registry.register(CaptureCollector(lambda: [writer]))
    assert 'mlmirror_capture_outcomes_total{route="m"} 2.0' in generate_latest(registry).decode()


def test_outcomes_share_the_queue_bound_and_a_closed_writer_counts_them(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path), queue_size=2))
    writer.offer(call("a"))
    writer.offer(call("b"))
    assert writer.offer_outcome("a", [], ["1"]) is True  # known, but the queue is full
    assert writer.stats.drops["queue_full"] == 1
    writer.close()
    assert writer.offer_outcome("b", [], ["1"]) is True
    assert writer.stats.drops["closed"] == 1


def test_the_feedback_service_offers_every_outcome_to_the_captures(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path)))
    writer.offer(call("a"))
    feedback = FeedbackService(lambda: [], lambda: [writer])
    counts = feedback.report([("a", [], ["x"]), ("z", [], ["y"])])
    assert counts["unknown"] == 2  # no ground-truth store knows them: the answer is as before
    writer.start()
    writer.stop()
    assert [r["request_id"] for r in lines(tmp_path) if r.get("record") == "outcome"] == ["a"]


def test_captured_inputs_skip_outcome_records(tmp_path: Path):
    writer = CaptureWriter("m", Capture(path=str(tmp_path)))
    writer.offer(call("a", np.array([[1.0, 2.0]])))
    writer.offer_outcome("a", [], ["1"])
    writer.offer(call("b", np.array([[3.0, 4.0]])))
    writer.start()
    writer.stop()
    [(name, values)] = captured_inputs(tmp_path)
    assert name == "input"
    np.testing.assert_array_equal(values, [[1.0, 2.0], [3.0, 4.0]])

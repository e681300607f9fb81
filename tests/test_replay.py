"""``mlmirror replay`` end to end: traffic captured through the real proxy (outcomes included), replayed by the
command line against real demo model servers, judged by gate files, with the reports read back."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlmirror.demo.models import CLASS_MEANS, MODELS
from mlmirror.protos import feedback_pb2, inference_pb2

from tests.support import REPO, http_get, iris_config, model_server, through_proxy, wait_until

pytestmark = pytest.mark.slow

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT_OUTCOME = "/mlmirror.v1.Feedback/ReportOutcome"
CALLS, ROWS = 300, 4
#: Calls whose outcome is reported: the first half over gRPC, the second over HTTP.
LABELLED = 120
#: Latency is judged in tests/test_replay_scoring.py with fixed numbers; here a busy machine must not decide.
RELAXED = "latency_factor: 1000\n"


@dataclass
class IrisCapture:
    directory: Path
    features: dict[str, np.ndarray]  # request id -> [ROWS, 4] FP32
    truth: dict[str, list[str]]  # request id -> true classes, for the labelled calls


def infer_request(x: np.ndarray, request_id: str) -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="iris", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request.SerializeToString()


def capture_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]


async def make_capture(directory: Path) -> IrisCapture:
    rng = np.random.default_rng(15)
    classes = rng.integers(0, 3, size=(CALLS, ROWS))
    x = (CLASS_MEANS[classes] + rng.normal(size=(CALLS, ROWS, 4)) * np.array([0.35, 0.35, 0.45, 0.2])).astype("<f4")
    ids = [f"call-{i:04d}" for i in range(CALLS)]
    async with model_server("production") as port:
        config = iris_config(port, f"capture: {{path: {directory}}}", match="{}")
        async with through_proxy(config) as (proxy, channel):
            infer = channel.unary_unary(MODEL_INFER)
            for i, request_id in enumerate(ids):
                await infer(infer_request(x[i], request_id), timeout=10)
            await wait_until(
                lambda: proxy.parts.get("iris", "capture").writer.stats.records == CALLS, 20, "the capture"
            )
            truth = {request_id: [str(c) for c in classes[i]] for i, request_id in enumerate(ids[:LABELLED])}
            half = LABELLED // 2
            report = channel.unary_unary(REPORT_OUTCOME, feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                         feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
            await report(feedback_pb2.ReportOutcomeRequest(
                outcomes=[feedback_pb2.Outcome(request_id=i, labels=truth[i]) for i in ids[:half]]
            ), timeout=10)  # fmt: skip
            body = json.dumps({"outcomes": [{"request_id": i, "labels": truth[i]} for i in ids[half:LABELLED]]})
            url = f"http://127.0.0.1:{proxy.admin_port}/outcomes"
            status, text = await asyncio.to_thread(http_get, url, "POST", body.encode())
            assert status == 200, text
            await wait_until(
                lambda: proxy.parts.get("iris", "capture").writer.stats.outcomes == LABELLED, 20, "the outcome records"
            )
    return IrisCapture(directory, {request_id: x[i] for i, request_id in enumerate(ids)}, truth)


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> IrisCapture:
    directory = tmp_path_factory.mktemp("capture")
    return asyncio.run(make_capture(directory))


async def replay_cli(*args: str | Path, role: str | None) -> subprocess.CompletedProcess:
    """``mlmirror replay ARGS --target <a demo model server of role>`` (role None: ``args`` give the target)."""

    def run(target: list[str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mlmirror", "replay", *map(str, args), *target]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=240)

    if role is None:
        return await asyncio.to_thread(run, [])
    async with model_server(role) as port:
        return await asyncio.to_thread(run, ["--target", f"127.0.0.1:{port}"])


def gate_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def junit_cases(report: Path) -> dict[str | None, ET.Element]:
    root = ET.parse(report / "junit.xml").getroot()
    return {case.get("name"): case for case in root.iter("testcase")}


# --- the capture ------------------------------------------------------------------------------------------------


def test_the_capture_holds_every_call_and_the_reported_outcomes_keyed_by_request_id(iris: IrisCapture):
    lines = capture_lines(iris.directory)
    calls = [line for line in lines if "record" not in line]
    outcomes = [line for line in lines if line.get("record") == "outcome"]
    assert [c["request_id"] for c in calls] == sorted(iris.features)
    assert {o["request_id"]: o["labels"] for o in outcomes} == iris.truth
    assert all(o["route"] == "iris" and o["values"] == [] for o in outcomes)


# --- exit codes and reports -------------------------------------------------------------------------------------


async def test_replayed_against_productions_twin_the_gate_passes(iris: IrisCapture, tmp_path: Path):
    gate = gate_file(tmp_path, "compare: {classification: argmax, output: probabilities}\n" + RELAXED)
    result = await replay_cli("--capture", iris.directory, "--gate", gate, "--report", tmp_path / "r",
                              role="production")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mlmirror replay: gate passed")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert report["calls"]["sent"] == CALLS
    assert report["comparison"]["samples"] == CALLS * ROWS
    assert report["comparison"]["agreement"] == 1.0
    assert report["comparison"]["abs_max"] == 0.0  # the twin answers the very bytes production answered
    assert report["capture"]["outcomes"] == LABELLED
    assert report["worst"] == []
    statuses = {c["name"]: c["status"] for c in report["criteria"]}
    assert statuses["drift probabilities[0]"] == statuses["drift label"] == "pass"
    assert all(case.find("failure") is None for case in junit_cases(tmp_path / "r").values())
    assert "passed" in (tmp_path / "r" / "report.md").read_text().splitlines()[0]


async def test_replayed_against_the_candidate_with_agreement_0995_the_gate_fails_on_agreement(
    iris: IrisCapture, tmp_path: Path
):
    gate = gate_file(tmp_path, "agreement: 0.995\ncompare: {classification: argmax, output: probabilities}\n" + RELAXED)
    result = await replay_cli("--capture", iris.directory, "--gate", gate, "--report", tmp_path / "r", role="candidate")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mlmirror replay: gate failed: agreement: ")
    cases = junit_cases(tmp_path / "r")
    failure = cases["agreement"].find("failure")
    assert failure is not None
    assert "0.995" in failure.get("message", "")
    assert cases["min_samples"].find("failure") is None
    assert cases["errors"].find("failure") is None
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # The numbers in the report are the ones numpy gives for the two models on the captured rows.
    x = np.concatenate([iris.features[i] for i in sorted(iris.features)])
    production = MODELS["production"].predict(x)[0].argmax(axis=1)
    candidate = MODELS["candidate"].predict(x)[0].argmax(axis=1)
    agree = int(np.count_nonzero(production == candidate))
    assert 0 < agree < x.shape[0]
    assert (report["comparison"]["agree"], report["comparison"]["samples"]) == (agree, x.shape[0])
    worst = report["worst"]
    assert worst
    assert all(w["disagreement"] > 0 for w in worst)
    disagreeing = {i for i in iris.features if (MODELS["production"].predict(iris.features[i])[1]
                                               != MODELS["candidate"].predict(iris.features[i])[1]).any()}  # fmt: skip
    assert {w["request_id"] for w in worst} <= disagreeing
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert next(line for line in markdown.splitlines() if line.startswith("| agreement |")).endswith("| FAIL |")
    assert f"`{worst[0]['request_id']}`" in markdown


async def test_a_dead_target_is_exit_2_with_the_reason(iris: IrisCapture, tmp_path: Path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    result = await replay_cli("--capture", iris.directory, "--target", dead, "--connect-timeout", "2s",
                              "--report", tmp_path / "r", role=None)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mlmirror replay: could not run: target {dead} unreachable: no connection within 2s"
    ]
    assert not (tmp_path / "r").exists()


async def test_a_bad_gate_file_is_exit_2_naming_file_line_and_key(iris: IrisCapture, tmp_path: Path):
    gate = gate_file(tmp_path, "agreement: 0.99\ndrift: {method: ks, threshold: 2}\n")
    result = await replay_cli("--capture", iris.directory, "--gate", gate, "--target", "127.0.0.1:1", role=None)
    assert result.returncode == 2
    reason = f"{gate}:2: drift.threshold: must be <= 1.0, got 2.0"
    assert result.stderr.strip() == f"mlmirror replay: could not run: bad gate file: {reason}"


async def test_quality_of_both_models_is_scored_on_the_labelled_calls(iris: IrisCapture, tmp_path: Path):
    gate = gate_file(
        tmp_path,
        """
        compare: {classification: argmax, output: probabilities}
        quality: {output: probabilities, metric: accuracy, margin: 0.0}
        drift: off
        agreement: 0.5
        latency_factor: 1000
    """,
    )
    result = await replay_cli("--capture", iris.directory, "--gate", gate, "--report", tmp_path / "r", role="candidate")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    labelled = sorted(iris.truth)
    x = np.concatenate([iris.features[i] for i in labelled])
    truth = np.array([int(c) for i in labelled for c in iris.truth[i]])
    accuracy = {role: float(np.mean(MODELS[role].predict(x)[0].argmax(axis=1) == truth))
                for role in ("production", "candidate")}  # fmt: skip
    quality = report["quality"]
    assert (quality["calls"], quality["rows"]) == (LABELLED, LABELLED * ROWS)
    assert quality["candidate"]["accuracy"] == pytest.approx(accuracy["candidate"], abs=1e-12)
    assert quality["production"]["accuracy"] == pytest.approx(accuracy["production"], abs=1e-12)
    criterion = next(c for c in report["criteria"] if c["name"] == "quality accuracy")
    passed = accuracy["candidate"] >= accuracy["production"]
    assert criterion["status"] == ("pass" if passed else "FAIL")
    assert result.returncode == (0 if passed else 1), result.stderr
    assert not any(c["name"].startswith("drift") for c in report["criteria"])


async def test_malformed_lines_are_counted_and_the_rest_is_replayed(iris: IrisCapture, tmp_path: Path):
    directory = tmp_path / "capture"
    shutil.copytree(iris.directory, directory)
    first = sorted(directory.glob("*.jsonl"))[0]
    text = first.read_text().splitlines(keepends=True)
    bad = [
        "not json at all\n",
        "[1, 2]\n",
        '{"method": "/x/Y", "code": "NOPE", "request": ""}\n',
        '{"method": "/x/Y", "code": "OK", "request": "%%%"}\n',
        '{"record": "outcome", "request_id": 3}\n',
    ]
    first.write_text("".join(text[:5] + bad + text[5:]))  # fmt: skip
    gate = gate_file(tmp_path, "compare: {classification: argmax, output: probabilities}\n" + RELAXED)
    result = await replay_cli("--capture", directory, "--gate", gate, "--report", tmp_path / "r", role="production")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["capture"]["malformed"] == {
        "not_json": 1, "not_an_object": 1, "bad_code": 1, "bad_base64": 1, "bad_outcome": 1
    }  # fmt: skip
    assert report["capture"]["malformed_examples"][0] == f"{first}:6: not_json"
    assert report["calls"]["sent"] == CALLS
    assert "5 malformed capture lines skipped" in (tmp_path / "r" / "report.md").read_text()


async def test_a_capture_without_usable_calls_is_exit_2(tmp_path: Path):
    capture = tmp_path / "capture.jsonl"
    capture.write_text('garbage\n{"record": "outcome", "request_id": "a", "labels": ["1"]}\n')
    result = await replay_cli("--capture", capture, "--target", "127.0.0.1:1", role=None)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mlmirror replay: could not run: no usable calls in the capture (2 lines in 1 files, 1 malformed)"
    )

"""Replay scoring without the network: reading captures, comparing answers, the gate's criteria against the live
shadow verdict, prediction drift against the live drift engine, and the reports."""

from __future__ import annotations

import base64
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import Compare, Drift, Promotion
from mlmirror.errors import ReplayError
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.shadows.verdict import judge, wilson_lower_bound
from mlmirror.protocol.kserve import Tensor
from mlmirror.replay.captured import CapturedCall, read_capture
from mlmirror.replay.criteria import evaluate
from mlmirror.replay.gate import DriftGate, Gate, QualityGate
from mlmirror.replay.prediction_drift import prediction_drift
from mlmirror.replay.quality import score_quality
from mlmirror.replay.reports import ReplayReport, write_reports
from mlmirror.replay.scoring import score_calls
from mlmirror.replay.sender import Answer

from tests.support import feed_calls, fp64_call

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
METHOD = "/test.Echo/Unary"  # not ModelInfer: answers are compared as bytes


def captured(i: int, *, code: grpc.StatusCode = OK, latency: float = 0.010, **kwargs) -> CapturedCall:
    values = {"request_id": f"r{i}", "route": "r", "method": METHOD, "model_name": None, "request": b"q",
              "response": b"same" if code is OK else None, "code": code, "latency": latency,
              "upstream_latency": latency, **kwargs}  # fmt: skip
    return CapturedCall(**values)


def answer(same: bool = True, *, code: grpc.StatusCode = OK, latency: float = 0.010) -> Answer:
    return Answer(code, (b"same" if same else b"different") if code is OK else None, latency)


def promotion_passes(gate: Gate, calls: list[CapturedCall], answers: list[Answer]) -> bool:
    scores = score_calls(calls, answers, gate.compare)
    criteria = evaluate(gate, scores, None, None)
    return all(c.passed for c in criteria if c.name in ("min_samples", "agreement", "errors", "latency"))


# --- reading a capture ------------------------------------------------------------------------------------------


def record(i: int, **fields) -> str:
    head = {"time": 1.0, "route": "r", "method": METHOD, "request_id": f"r{i}", "code": "OK", "served_by": "p",
            "role": "primary", "latency": 0.02, "upstream_latency": 0.01,
            "request": base64.b64encode(b"q%d" % i).decode(), "response": base64.b64encode(b"a").decode()}  # fmt: skip
    return json.dumps({**head, **fields}) + "\n"


def test_a_capture_directory_is_read_oldest_file_first_with_outcomes_joined_by_id(tmp_path: Path):
    (tmp_path / "capture-20260101T000002.000000Z-000002.jsonl").write_text(
        record(2)
        + json.dumps({"record": "outcome", "request_id": "r1", "labels": ["later"]})
        + "\n"
        + json.dumps({"record": "outcome", "request_id": "r2", "values": ["NaN", 2]})
        + "\n"
    )
    (tmp_path / "capture-20260101T000001.000000Z-000001.jsonl").write_text(
        record(0) + record(1, role="fallback") + "\n" + record(3, request=None) + record(4, code="UNAVAILABLE")
        + json.dumps({"record": "outcome", "request_id": "r1", "labels": ["again"]}) + "\n"
    )  # fmt: skip
    (tmp_path / "notes.txt").write_text("not a capture\n")
    contents = read_capture([tmp_path])
    assert [c.request_id for c in contents.calls] == ["r0", "r1", "r4", "r2"]
    assert [c.request for c in contents.calls] == [b"q0", b"q1", b"q4", b"q2"]
    first = contents.calls[0]
    assert (first.response, first.code, first.latency, first.upstream_latency, first.primary) == (
        b"a", OK, 0.02, 0.01, True
    )  # fmt: skip
    assert contents.calls[1].primary is False
    assert (contents.calls[2].code, contents.calls[2].response) == (UNAVAILABLE, None)
    assert contents.without_request == 1
    assert contents.duplicate_outcomes == 1
    assert (contents.outcomes["r1"].labels, contents.outcomes["r1"].values) == (("again",), ())
    assert math.isnan(contents.outcomes["r2"].values[0])
    assert contents.outcomes["r2"].values[1:] == (2.0,)
    assert contents.malformed == {}
    assert contents.lines == 8


def test_limit_counts_usable_calls_and_missing_paths_are_replay_errors(tmp_path: Path):
    capture = tmp_path / "c.jsonl"
    capture.write_text("".join(record(i) for i in range(10)))
    assert [c.request_id for c in read_capture([capture], limit=3).calls] == ["r0", "r1", "r2"]
    with pytest.raises(ReplayError, match="no such capture file or directory"):
        read_capture([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match=r"no capture files \(\*.jsonl\)"):
        read_capture([tmp_path / "empty"])


# --- comparing and judging --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_the_promotion_criteria_pass_exactly_when_the_live_verdict_says_promotable(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    gate = Gate(promotion=Promotion(min_samples=int(rng.integers(20, 300)), agreement=float(rng.uniform(0.8, 1.0)),
                                    confidence=0.95, error_margin=float(rng.uniform(0, 0.05)),
                                    latency_factor=float(rng.uniform(0.8, 2.0))))  # fmt: skip
    production_errors = rng.uniform(size=n) < rng.uniform(0, 0.05)
    calls = [captured(i, code=UNAVAILABLE if production_errors[i] else OK, latency=float(rng.uniform(0.005, 0.02)))
             for i in range(n)]  # fmt: skip
    disagree, errors = rng.uniform(0, 0.1), rng.uniform(0, 0.08)
    answers = [answer(bool(rng.uniform() > disagree), code=UNAVAILABLE if rng.uniform() < errors else OK,
                      latency=float(rng.uniform(0.005, 0.03))) for _ in range(n)]  # fmt: skip
    scores = score_calls(calls, answers, gate.compare)
    verdict = judge(scores.summary, gate.promotion, 0.0)
    assert promotion_passes(gate, calls, answers) == verdict.promotable
    agreement = next(c for c in evaluate(gate, scores, None, None) if c.name == "agreement")
    assert agreement.value == verdict.lower_bound
    assert agreement.value == wilson_lower_bound(scores.summary.agree, scores.summary.samples, 0.95)


def test_latency_is_the_candidates_p99_against_productions_captured_p99():
    gate = Gate(promotion=Promotion(min_samples=1, agreement=0.0, latency_factor=1.5))
    calls = [captured(i, latency=0.010) for i in range(100)]
    assert promotion_passes(gate, calls, [answer(latency=0.014) for _ in calls])
    assert not promotion_passes(gate, calls, [answer(latency=0.016) for _ in calls])
    scores = score_calls(calls, [answer(latency=0.016) for _ in calls], gate.compare)
    latency = next(c for c in evaluate(gate, scores, None, None) if c.name == "latency")
    assert (latency.value, latency.threshold) == (pytest.approx(0.016), pytest.approx(0.015))
    assert latency.detail == "candidate p99 16.00 ms vs 1.5 x production p99 10.00 ms"


def test_errors_are_counted_by_code_against_productions_captured_errors():
    gate = Gate(promotion=Promotion(min_samples=1, agreement=0.0, error_margin=0.01))
    calls = [captured(i, code=UNAVAILABLE if i < 2 else OK) for i in range(100)]  # production: 2 %
    fine = [answer(code=grpc.StatusCode.INTERNAL if i in (50, 60) else OK) for i in range(100)]
    assert promotion_passes(gate, calls, fine)  # 2 % <= 2 % + 1 %
    worse = [answer(code=grpc.StatusCode.INTERNAL if 50 <= i < 54 else OK) for i in range(100)]
    assert not promotion_passes(gate, calls, worse)  # 4 %
    scores = score_calls(calls, worse, gate.compare)
    assert scores.candidate_codes == {"OK": 96, "INTERNAL": 4}
    assert scores.production_codes == {"UNAVAILABLE": 2, "OK": 98}


def test_redacted_calls_and_fallback_answers_are_not_compared():
    calls = [captured(0), captured(1, redacted=("ssn",)), captured(2, primary=False)]
    scores = score_calls(calls, [answer(False), answer(False), answer(False)], Compare())
    s = scores.summary
    assert (s.compared, s.samples, s.agree, scores.not_compared, scores.redacted) == (1, 1, 0, 2, 1)
    assert scores.production_codes == {"OK": 2, "FALLBACK": 1}
    assert s.production_errors == 1  # production's primary did not answer the fallback's call
    assert [w.request_id for w in scores.worst] == ["r0"]


# --- prediction drift and quality -------------------------------------------------------------------------------


def outputs(y: np.ndarray, labels: np.ndarray) -> list[Tensor]:
    return [Tensor("y", "FP64", y.shape, y), Tensor("label", "INT64", labels.shape, labels)]


def test_prediction_drift_scores_as_the_live_engine_does():
    rng = np.random.default_rng(3)
    calls = 40
    production_y = rng.normal(size=(calls, 5, 2))
    candidate_y = production_y + np.array([0.4, 0.0])
    pairs = [(outputs(production_y[i], np.zeros(5, np.int64)), outputs(candidate_y[i], np.zeros(5, np.int64)))
             for i in range(calls)]  # fmt: skip
    replayed = prediction_drift(pairs, DriftGate(method="psi", threshold=0.2, outputs=("y",)))
    # The live engine: production's outputs as the captured reference, the candidate's as the next window.
    engine = DriftEngine("m", Drift(outputs=("y",), capture=calls, window=calls, methods=("psi",), detect="psi",
                                    multivariate=None, alarm_level=None))  # fmt: skip
    feed_calls(engine, (fp64_call(np.zeros((5, 1)), [("y", production_y[i])]) for i in range(calls)))
    feed_calls(engine, (fp64_call(np.zeros((5, 1)), [("y", candidate_y[i])]) for i in range(calls)))
    live = {s.name: s for s in engine.latest[("m", "1")].series if s.kind == "output"}
    assert [s.name for s in replayed.series] == ["y[0]", "y[1]"]
    for series in replayed.series:
        assert series.scores == pytest.approx(live[series.name].scores, abs=1e-12)
        assert series.drifted == live[series.name].drifted
    assert [s.drifted for s in replayed.series] == [True, False]
    assert (replayed.calls, replayed.rows) == (calls, calls * 5)


def test_identical_outputs_do_not_drift_and_a_missing_output_fails_the_criterion():
    y, labels = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    same = prediction_drift([(outputs(y, labels), outputs(y, labels))] * 5, DriftGate())
    assert {s.name: (s.method, s.scores[s.method], s.drifted) for s in same.series} == {
        "y[0]": ("ks", 1.0, False), "y[1]": ("ks", 1.0, False), "label": ("chi2", 1.0, False)
    }  # fmt: skip
    nothing = prediction_drift([], DriftGate())
    [skipped] = [c for c in evaluate(Gate(), score_calls([], [], Compare()), nothing, None) if c.name == "drift"]
    assert (skipped.passed, skipped.detail) == (None, "no compared KServe ModelInfer calls")
    missing = prediction_drift([(outputs(y, labels), outputs(y, labels))], DriftGate(outputs=("nope",)))
    assert (missing.series, missing.errors) == ((), {"missing_tensor": 1})
    scores = score_calls([captured(0)], [answer()], Compare())
    [criterion] = [c for c in evaluate(Gate(), scores, missing, None) if c.name.startswith("drift")]
    assert criterion.passed is False
    assert criterion.detail == "no output series could be read (missing_tensor x1)"


def test_regression_quality_is_mae_and_rmse_on_the_labelled_rows():
    from mlmirror.replay.captured import GroundTruthRecord

    truth = [1.0, 2.0, 4.0]
    production = [Tensor("y", "FP64", (3, 1), np.array([[1.0], [2.5], [3.0]]))]
    candidate = [Tensor("y", "FP64", (3, 1), np.array([[2.0], [2.0], [4.0]]))]
    labelled = [(GroundTruthRecord(tuple(truth), ()), production, candidate),
                (GroundTruthRecord((1.0,), ()), production, candidate)]  # fmt: skip
    quality = score_quality(labelled, QualityGate(task="regression", metric="rmse", margin=0.0))
    assert quality is not None
    assert (quality.output, quality.calls, quality.rows, quality.invalid) == ("y", 1, 3, 1)
    assert quality.production == pytest.approx({"mae": 0.5, "rmse": math.sqrt(1.25 / 3)})
    assert quality.candidate == pytest.approx({"mae": 1 / 3, "rmse": math.sqrt(1 / 3)})
    scores = score_calls([captured(0)], [answer()], Compare())
    gate = Gate(quality=QualityGate(task="regression", metric="rmse", margin=0.0))
    [criterion] = [c for c in evaluate(gate, scores, None, quality) if c.name == "quality rmse"]
    assert criterion.passed is True  # lower is better: 0.577 <= 0.645


# --- reports ----------------------------------------------------------------------------------------------------


def test_reports_carry_every_criterion_and_nan_becomes_null(tmp_path: Path):
    from mlmirror.replay.captured import CaptureContents

    calls = [captured(i) for i in range(3)]
    answers = [answer(), answer(False), answer(code=UNAVAILABLE)]
    gate = Gate()
    scores = score_calls(calls, answers, gate.compare)
    criteria = evaluate(gate, scores, None, None)
    report = ReplayReport("127.0.0.1:1", gate, CaptureContents(calls=calls), 3, scores, None, None, criteria, 0.5)
    md, junit, js = write_reports(report, tmp_path / "out")
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert list(cases) == ["min_samples", "agreement", "errors", "latency", "quality accuracy"]
    assert cases["min_samples"].find("failure").get("message") == "min_samples: 2 vs threshold 200"
    assert cases["quality accuracy"].find("skipped") is not None
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("5", "3", "1")
    document = json.loads(js.read_text())
    assert document["verdict"] == "fail"
    assert document["calls"]["candidate_codes"] == {"OK": 2, "UNAVAILABLE": 1}
    assert document["comparison"]["mae"] is None  # NaN: bytes answers have no numeric elements
    assert document["worst"] == [{"request_id": "r1", "location": "", "disagreement": 1.0, "abs_max": None,
                                  "error": None}]  # fmt: skip
    text = md.read_text()
    assert text.startswith("## mlmirror replay: ❌ failed (3 of 5 criteria)")
    assert "| quality accuracy | n/a | n/a | skipped |" in text
    assert "Candidate answers by code: OK 2, UNAVAILABLE 1" in text


def test_calls_captured_without_productions_answer_are_sent_but_not_compared(tmp_path: Path):
    from mlmirror.replay.captured import CaptureContents

    calls = [captured(0, response=None), captured(1, response=None, redacted=("ssn",))]
    scores = score_calls(calls, [answer(), answer()], Compare())
    assert (scores.summary.compared, scores.summary.samples, scores.not_compared) == (0, 0, 2)
    gate = Gate(promotion=Promotion(min_samples=1))
    criteria = evaluate(gate, scores, None, None)
    assert next(c for c in criteria if c.name == "min_samples").passed is False
    report = ReplayReport("t", gate, CaptureContents(calls=calls), 2, scores, None, None, criteria, 0.1)
    [md, _, _] = write_reports(report, tmp_path)
    text = md.read_text()
    assert "> 2 calls without production's answer in the capture (include: request): not compared" in text
    assert "> 1 calls with redacted inputs: replayed, not compared" in text


def test_progress_is_drawn_on_a_terminal_only():
    import io

    from mlmirror.replay.run import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress(io.StringIO()) is None
    terminal = Terminal()
    show = _progress(terminal)
    assert show is not None
    show(1, 4)
    show(4, 4)  # the last is always drawn, and ends the line
    assert terminal.getvalue() == (f"\rreplaying [{'#' * 7}{'.' * 23}] 1/4" + f"\rreplaying [{'#' * 30}] 4/4\n")

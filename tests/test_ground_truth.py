"""Ground truth: predictions joined with outcomes reported later, quality per model version and window, and the
outcomes that cannot be joined — against the real proxy, its gRPC Feedback service and its HTTP endpoint."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from mlmirror.config import GroundTruth
from mlmirror.demo.models import CLASS_MEANS, sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.groundtruth.outcomes import GroundTruthStore, classification_metrics
from mlmirror.protocol.kserve import Tensor
from mlmirror.protos import feedback_pb2

from tests.support import http_get, iris_config, model_server, through_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/mlmirror.v1.Feedback/ReportOutcome"


def reference_metrics(predicted: list[str], actual: list[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 from a confusion matrix (numpy), independently of the code tested."""
    classes = sorted(set(predicted) | set(actual))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)))
    for p, a in zip(predicted, actual, strict=True):
        confusion[index[a], index[p]] += 1
    tp = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / confusion.sum(axis=0))
        recall = np.nan_to_num(tp / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {
        "accuracy": tp.sum() / confusion.sum(),
        "precision": precision.mean(),
        "recall": recall.mean(),
        "f1": f1.mean(),
    }


def test_classification_metrics_match_a_confusion_matrix():
    rng = np.random.default_rng(0)
    for _ in range(20):
        actual = [str(c) for c in rng.integers(0, 4, size=200)]
        predicted = [a if rng.random() < 0.7 else str(rng.integers(0, 5)) for a in actual]
        got = classification_metrics(predicted, actual)
        expected = reference_metrics(predicted, actual)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def probabilities(rows: np.ndarray) -> list[Tensor]:
    return [Tensor("probabilities", "FP32", rows.shape, rows.astype(np.float32))]


def test_predictions_join_their_outcomes_and_the_rest_is_counted():
    now = [0.0]  # seconds: the store's clock, moved by hand (a busy machine's pauses cannot expire anything)
    store = GroundTruthStore(
        GroundTruth(output="probabilities", window=4, ttl=0.2, max_pending=3), clock=lambda: now[0]
    )
    key = ("iris", "1")
    preds = store.predictions(probabilities(np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])))
    assert preds == ["1", "0"]
    store.remember("a", key, preds)
    store.remember("b", key, ["2"])
    assert store.report("a", [], ["1", "2"]) == "matched"  # one right, one wrong
    assert store.report("a", [], ["1", "2"]) == "duplicate"
    assert store.report("nobody", [], ["1"]) == "unknown"
    assert store.report("b", [], ["2", "2"]) == "invalid"  # two outcomes for a one-row call
    store.remember("c", key, ["0"])
    store.remember("d", key, ["0"])
    store.remember("e", key, ["0"])
    store.remember("f", key, ["1"])  # pushes "c" out: max_pending is 3
    assert store.report("c", [], ["0"]) == "late"
    now[0] += 0.25  # the rest expire
    assert store.report("d", [], ["0"]) == "late"
    store.remember("g", key, ["0"])
    store.remember("h", key, ["1"])
    assert store.report("g", [], ["0"]) == "matched"
    assert store.report("h", [], ["0"]) == "matched"  # the 4th joined row: the window closes
    snapshot = store.snapshot()
    assert snapshot["results"] == {"matched": 3, "unknown": 1, "late": 2, "duplicate": 1, "invalid": 1}
    (window,) = snapshot["latest"].values()
    assert (window.model, window.version, window.rows) == ("iris", "1", 4)
    expected = reference_metrics(["1", "0", "0", "1"], ["1", "2", "0", "0"])
    for name, value in expected.items():
        assert window.metrics[name] == pytest.approx(value)


def test_regression_quality_is_mae_and_rmse():
    store = GroundTruthStore(GroundTruth(output="y", task="regression", window=10))
    rng = np.random.default_rng(1)
    predicted = rng.normal(size=10)
    actual = predicted + rng.normal(scale=0.5, size=10)
    for i in range(10):
        store.remember(str(i), ("m", "v"), store.predictions([Tensor("y", "FP64", (1,), predicted[i : i + 1])]))
        assert store.report(str(i), [actual[i]], []) == "matched"
    assert store.report("x", [], ["label"]) == "unknown"
    (window,) = store.snapshot()["latest"].values()
    assert window.metrics["mae"] == pytest.approx(np.mean(np.abs(actual - predicted)))
    assert window.metrics["rmse"] == pytest.approx(np.sqrt(np.mean((actual - predicted) ** 2)))


def true_classes(x: np.ndarray) -> np.ndarray:
    return np.argmin(((x[:, None, :] - CLASS_MEANS[None].astype(np.float32)) ** 2).sum(axis=2), axis=1)


async def test_outcomes_reported_late_over_grpc_and_http_give_quality_per_version():
    rng = np.random.default_rng(2)
    async with model_server("production") as production:
        drift = "drift: {window: 100, capture: 50, ground_truth: {output: probabilities, window: 100}}"
        config = iris_config(production, drift)
        async with through_proxy(config) as (proxy, channel):
            infer = channel.unary_unary(MODEL_INFER)
            features = [sample_features(rng, 1) for _ in range(240)]
            ids = [f"call-{i}" for i in range(240)]
            await asyncio.gather(*(infer(infer_request(x, request_id=i)) for x, i in zip(features, ids, strict=True)))
            engine = proxy.parts.get("iris", "drift").engine
            await wait_until(lambda: engine.ground_truth.snapshot()["pending"] == 240, what="predictions stored")
            truth = [str(int(true_classes(x)[0])) for x in features]
            # The first 150 outcomes over gRPC, the next 60 over HTTP, 30 never; plus an unknown id and a repeat.
            report = channel.unary_unary(REPORT, feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                         feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
            outcomes = [
                feedback_pb2.Outcome(request_id=i, labels=[t]) for i, t in zip(ids[:150], truth[:150], strict=True)
            ]
            outcomes.append(feedback_pb2.Outcome(request_id="never-seen", labels=["0"]))
            answer = await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes))
            assert (answer.matched, answer.unknown, answer.early) == (150, 0, 1)  # parked: its prediction may come
            outcomes_url = f"http://127.0.0.1:{proxy.admin_port}/outcomes"
            body = json.dumps({"outcomes": [{"request_id": i, "labels": [t]} for i, t in
                                            zip(ids[150:210], truth[150:210], strict=True)]
                               + [{"request_id": ids[0], "labels": [truth[0]]}]})  # fmt: skip
            status, text = await asyncio.to_thread(http_get, outcomes_url, "POST", body.encode())
            assert status == 200, text
            assert json.loads(text) == {"matched": 60, "unknown": 0, "late": 0, "duplicate": 1, "invalid": 0,
                                        "early": 0}  # fmt: skip
            status, text = await asyncio.to_thread(http_get, outcomes_url, "POST", b'{"outcomes": 3}')
            assert status == 400
            assert "expected" in text

            ground = proxy.status()["routes"][0]["drift"]["ground_truth"]
            assert ground["outcomes"] == {"matched": 210, "unknown": 0, "late": 0, "duplicate": 1, "invalid": 0}
            assert ground["pending"] == 30
            windows = ground["latest"]
            assert [(w["model"], w["version"], w["index"], w["rows"]) for w in windows] == [("iris", "1", 1, 100)]
            predicted = [str(int(np.argmax(_model_probabilities(x)))) for x in features[100:200]]
            expected = reference_metrics(predicted, truth[100:200])
            for name, value in expected.items():
                assert windows[0]["metrics"][name] == pytest.approx(value, abs=1e-6)
            assert windows[0]["metrics"]["accuracy"] > 0.85
            status, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
            assert 'mlmirror_quality{metric="accuracy",model="iris",route="iris",version="1"} ' in metrics
            assert 'mlmirror_outcomes_total{result="matched",route="iris"} 210.0' in metrics


def _model_probabilities(x: np.ndarray) -> np.ndarray:
    from mlmirror.demo.models import MODELS

    return MODELS["production"].predict(x)[0][0]


async def test_the_feedback_service_answers_even_without_ground_truth_configured():
    async with model_server("production") as production:
        config = f"""
        upstreams: {{production: 127.0.0.1:{production}}}
        routes: [{{match: {{}}, primary: production}}]
        """
        async with through_proxy(config) as (proxy, channel):
            report = channel.unary_unary(REPORT, feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                         feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
            answer = await report(feedback_pb2.ReportOutcomeRequest(outcomes=[feedback_pb2.Outcome(request_id="x")]))
            assert answer.unknown == 1
            assert proxy.feedback.unknown == 1
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(REPORT)(b"\xff\xff")  # malformed request bytes
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a ReportOutcomeRequest" in caught.value.details()

"""Outcomes reported the instant their answer returns, before the drift engine has remembered the prediction:
parked and joined when it lands (``early`` meanwhile), ``unknown`` only past ``feedback.early_ttl``, and the park
bounded by ``feedback.early_max`` whatever the flood. Against the in-process proxy, ``mlmirror serve`` (supervisor,
worker, observing process) and ``mlmirror serve --single-process``, over gRPC Feedback and ``POST /outcomes``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from mlmirror.config import GroundTruth
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.groundtruth.feedback import FeedbackService
from mlmirror.observing.groundtruth.outcomes import GroundTruthStore
from mlmirror.observing.groundtruth.park import OutcomePark
from mlmirror.protocol.kserve import Tensor
from mlmirror.protos import feedback_pb2

from loadtest.ports import free_port
from loadtest.processes import stop_process
from tests.support import REPO, http_get, model_server, through_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/mlmirror.v1.Feedback/ReportOutcome"

ROUTE = """
routes:
  - name: iris
    match: {model: iris}
    primary: production
    drift: {window: 100, capture: 100, ground_truth: {output: probabilities, window: 100}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store_with(clock: Clock) -> GroundTruthStore:
    return GroundTruthStore(GroundTruth(output="y", task="classification"), clock=clock)


def prediction(store: GroundTruthStore, label: str) -> list:
    return store.predictions([Tensor("y", "BYTES", (1,), np.array([label.encode()], dtype=object))])


def test_an_outcome_before_its_prediction_is_early_then_joined_and_unknown_only_past_the_ttl():
    clock = Clock()
    store = store_with(clock)
    feedback = FeedbackService(lambda: [store], park=OutcomePark(100, 5.0, clock=clock))
    answer = feedback.report([("a", [], ["cat"]), ("b", [], ["dog"])])
    assert (answer["early"], answer["unknown"], answer["matched"]) == (2, 0, 0)
    assert len(feedback.park) == 2
    store.remember("a", ("m", "1"), prediction(store, "cat"))  # the prediction lands: the parked outcome joins
    assert store.results["matched"] == 1
    assert len(feedback.park) == 1
    assert feedback.unknown == 0
    clock.now = 5.1  # b's prediction never came within the TTL
    assert feedback.park.expire() == 1
    assert (feedback.unknown, feedback.park.expired, len(feedback.park)) == (1, 1, 0)
    store.remember("b", ("m", "1"), prediction(store, "dog"))  # too late: nothing parked is joined
    assert store.results["matched"] == 1
    assert feedback.report([("a", [], ["cat"])])["duplicate"] == 1  # a known id is not parked


def test_a_flood_of_ids_that_never_come_keeps_the_park_at_its_bound():
    clock = Clock()
    store = store_with(clock)
    feedback = FeedbackService(lambda: [store], park=OutcomePark(1000, 10.0, clock=clock))
    total = {"early": 0}
    for start in range(0, 100_000, 10_000):
        answer = feedback.report((f"never-{i}", [], ["x"]) for i in range(start, start + 10_000))
        total["early"] += answer["early"]
        assert len(feedback.park) == 1000
    assert total["early"] == 100_000
    assert feedback.park.evicted == 99_000
    assert feedback.unknown == 99_000  # dropped to make room: unknown
    store.remember("never-99999", ("m", "1"), prediction(store, "x"))  # the newest are the ones kept
    store.remember("never-0", ("m", "1"), prediction(store, "x"))
    assert store.results["matched"] == 1


def test_the_park_refuses_a_bad_bound():
    with pytest.raises(ValueError, match="capacity"):
        OutcomePark(-1, 1.0)
    with pytest.raises(ValueError, match="ttl"):
        OutcomePark(1, 0.0)


async def immediate_reports(
    call: Callable[[int], Awaitable[Any]], report: Callable[[int], Awaitable[Any]], n: int, concurrency: int = 16
) -> list[dict[str, int]]:
    """``n`` calls from ``concurrency`` loops, each call's outcome reported the instant its answer returns."""
    answers: list[dict[str, int]] = []
    ids = iter(range(n))

    async def loop() -> None:
        for i in ids:
            await call(i)
            answers.append(await report(i))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return answers


def grpc_reporter(channel: grpc.aio.Channel, prefix: str) -> Callable[[int], Awaitable[Any]]:
    stub = channel.unary_unary(REPORT, feedback_pb2.ReportOutcomeRequest.SerializeToString,
                               feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip

    async def report(i: int) -> dict[str, int]:
        outcome = feedback_pb2.Outcome(request_id=f"{prefix}-{i}", labels=["0"])
        answer = await stub(feedback_pb2.ReportOutcomeRequest(outcomes=[outcome]), timeout=10)
        return {"matched": answer.matched, "early": answer.early, "unknown": answer.unknown}

    return report


def http_reporter(admin: int, prefix: str) -> Callable[[int], Awaitable[Any]]:
    async def report(i: int) -> dict[str, int]:
        body = json.dumps({"outcomes": [{"request_id": f"{prefix}-{i}", "labels": ["0"]}]}).encode()
        status, text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/outcomes", "POST", body)
        assert status == 200, text
        return json.loads(text)

    return report


def caller(channel: grpc.aio.Channel, prefix: str, rng: np.random.Generator) -> Callable[[int], Awaitable[Any]]:
    infer = channel.unary_unary(MODEL_INFER)

    async def call(i: int) -> None:
        await infer(infer_request(sample_features(rng, 1), request_id=f"{prefix}-{i}"), timeout=10)

    return call


def none_lost(answers: list[dict[str, int]]) -> None:
    assert len(answers) == 1000
    assert sum(a["matched"] + a["early"] for a in answers) == 1000, answers
    assert sum(a["unknown"] for a in answers) == 0


async def test_outcomes_reported_the_instant_their_answer_returns_all_match_in_process():
    rng = np.random.default_rng(0)
    async with model_server("production") as production:
        config = f"mirror_shed_lag: off\nupstreams: {{production: 127.0.0.1:{production}}}\n{ROUTE}"
        async with through_proxy(config) as (proxy, channel):
            store = proxy.parts.get("iris", "drift").engine.ground_truth
            over_grpc = await immediate_reports(caller(channel, "g", rng), grpc_reporter(channel, "g"), 1000)
            none_lost(over_grpc)
            over_http = await immediate_reports(caller(channel, "h", rng), http_reporter(proxy.admin_port, "h"), 1000)
            none_lost(over_http)
            await wait_until(lambda: store.results["matched"] == 2000, 30, "2,000 outcomes joined")
            assert store.results == {"matched": 2000, "unknown": 0, "late": 0, "duplicate": 0, "invalid": 0}
            assert (proxy.feedback.unknown, len(proxy.feedback.park)) == (0, 0)
            early = sum(a["early"] for a in over_grpc + over_http)
            assert proxy.feedback.park.joined == early


async def test_parked_outcomes_past_their_ttl_are_counted_unknown_in_the_metrics():
    async with model_server("production") as production:
        config = (
            f"feedback: {{early_ttl: 200ms, early_max: 2}}\nupstreams: {{production: 127.0.0.1:{production}}}\n{ROUTE}"
        )
        async with through_proxy(config) as (proxy, channel):
            answer = await grpc_reporter(channel, "never")(0)
            assert answer == {"matched": 0, "early": 1, "unknown": 0}
            metrics_url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
            _, text = await asyncio.to_thread(http_get, metrics_url)
            assert "mlmirror_outcomes_early 1.0" in text

            for _ in range(500):  # the admin endpoint runs on this event loop: ask it from a thread
                _, text = await asyncio.to_thread(http_get, metrics_url)
                if 'mlmirror_outcomes_early_dropped_total{reason="expired"} 1.0' in text:
                    break
                await asyncio.sleep(0.02)
            assert 'mlmirror_outcomes_early_dropped_total{reason="expired"} 1.0' in text
            assert "mlmirror_outcomes_early 0.0" in text
            assert proxy.feedback.unknown == 1


# --- real processes ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(folder: Path, production: int, shape: list[str]) -> AsyncIterator[tuple[int, int]]:
    """``mlmirror serve`` with ``shape`` (its process arguments); yields (listen port, admin port) once ready."""
    listen, admin = free_port(), free_port()
    config = folder / "mlmirror.yaml"
    config.write_text(f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nmirror_shed_lag: off\n"
                      f"shutdown_delay: 0s\nupstreams: {{production: 127.0.0.1:{production}}}\n{ROUTE}")  # fmt: skip
    log = folder / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(  # noqa: ASYNC220 - beside the test, stopped in a thread
            [sys.executable, "-m", "mlmirror", "serve", "--config", str(config), *shape],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
            except OSError:
                return False

        await wait_until(up, 90, "mlmirror serve to be ready")
        yield listen, admin
    finally:
        await asyncio.to_thread(stop_process, process, 30)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [["--workers", "1"], ["--single-process"]], ids=["group", "single-process"])
async def test_immediate_outcomes_all_match_through_mlmirror_serve(tmp_path: Path, shape: list[str]):
    rng = np.random.default_rng(1)
    async with model_server("production") as production, serving(tmp_path, production, shape) as (listen, admin):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
            over_grpc = await immediate_reports(caller(channel, "g", rng), grpc_reporter(channel, "g"), 500)
            over_http = await immediate_reports(caller(channel, "h", rng), http_reporter(admin, "h"), 500)
        none_lost(over_grpc + over_http)

        def outcomes() -> dict:
            status, body = http_get(f"http://127.0.0.1:{admin}/status")
            return json.loads(body)["routes"][0]["drift"]["ground_truth"]["outcomes"] if status == 200 else {}

        await wait_until(lambda: outcomes().get("matched") == 1000, 60, "1,000 outcomes joined")
        assert outcomes() == {"matched": 1000, "unknown": 0, "late": 0, "duplicate": 0, "invalid": 0}
        _, metrics = http_get(f"http://127.0.0.1:{admin}/metrics")
        assert 'mlmirror_outcomes_early_dropped_total{reason="expired"} 0.0' in metrics

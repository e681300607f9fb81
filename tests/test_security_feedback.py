"""Who may report outcomes: forged outcomes without a credential are refused (gRPC and HTTP), counted, and change no
figure; with the token they are joined. In-process proxies, real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import parse_config
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.groundtruth.access import FeedbackGate, rejection_counter
from mlmirror.protos import feedback_pb2
from mlmirror.runtime.proxy import Proxy
from prometheus_client import CollectorRegistry

from loadtest.ports import free_port
from tests.support import http_get, model_server, running_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/mlmirror.v1.Feedback/ReportOutcome"
TOKEN = "s3cret-feedback-token"


def watched_config(production: int, extra: str = "") -> str:
    extra = extra.replace("\n", "\n    ")  # the lines of ``extra`` at the document's indentation
    return f"""
    mirror_shed_lag: off
    {extra}
    upstreams: {{production: 127.0.0.1:{production}}}
    routes:
      - name: iris
        match: {{model: iris}}
        primary: production
        drift: {{window: 100, capture: 50, ground_truth: {{output: probabilities, window: 10}}}}
    """


def rejected(proxy: Proxy) -> dict[str, float]:
    status, text = http_get(f"http://127.0.0.1:{proxy.admin_port}/metrics")
    assert status == 200
    counts = {}
    for line in text.splitlines():
        if line.startswith("mlmirror_feedback_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def outcomes_of(proxy: Proxy) -> dict[str, int]:
    return proxy.status()["routes"][0]["drift"]["ground_truth"]["outcomes"]


async def predicted(proxy: Proxy, ids: list[str]) -> None:
    """Send one ModelInfer call per id through ``proxy`` and wait until each prediction waits for its outcome."""
    rng = np.random.default_rng(0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        infer = channel.unary_unary(MODEL_INFER)
        await asyncio.gather(*(infer(infer_request(sample_features(rng, 1), request_id=i), timeout=10) for i in ids))
    engine = proxy.parts.get("iris", "drift").engine
    await wait_until(lambda: engine.ground_truth.snapshot()["pending"] == len(ids), what="predictions stored")


def report_request(ids: list[str]) -> bytes:
    outcomes = [feedback_pb2.Outcome(request_id=i, labels=["0"]) for i in ids]
    return feedback_pb2.ReportOutcomeRequest(outcomes=outcomes).SerializeToString()


async def report(port: int, ids: list[str], metadata: tuple = ()) -> feedback_pb2.ReportOutcomeResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await channel.unary_unary(REPORT)(report_request(ids), metadata=metadata, timeout=10)
    return feedback_pb2.ReportOutcomeResponse.FromString(answer)


def post_outcomes(proxy: Proxy, ids: list[str], token: str | None = None) -> tuple[int, str]:
    body = json.dumps({"outcomes": [{"request_id": i, "labels": ["0"]} for i in ids]}).encode()
    return http_get(f"http://127.0.0.1:{proxy.admin_port}/outcomes", "POST", body, token=token)


async def test_forged_outcomes_without_the_token_are_refused_counted_and_change_nothing(tmp_path, caplog):
    token_file = tmp_path / "feedback.token"
    token_file.write_text(TOKEN + "\n")
    caplog.set_level(logging.INFO)
    async with model_server("production") as production:
        extra = f"listen: 0.0.0.0:0\nfeedback: {{token_file: {token_file}}}"
        async with running_proxy(watched_config(production, extra)) as proxy:
            ids = [f"call-{i}" for i in range(4)]
            await predicted(proxy, ids)
            before = outcomes_of(proxy)
            for metadata in ((), (("authorization", "Bearer not-the-token"),), (("authorization", TOKEN),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await report(proxy.grpc_port, ids, metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TOKEN not in (caught.value.details() or "")
            for token in (None, "not-the-token"):
                status, text = await asyncio.to_thread(post_outcomes, proxy, ids, token)
                assert status == 401, text
            assert outcomes_of(proxy) == before  # no figure moved
            assert outcomes_of(proxy)["matched"] == 0
            counts = await asyncio.to_thread(rejected, proxy)
            assert counts == {"missing": 3, "wrong_token": 2, "certificate": 0, "closed": 0}

            answer = await report(proxy.grpc_port, ids[:2], (("authorization", f"Bearer {TOKEN}"),))
            assert answer.matched == 2
            status, text = await asyncio.to_thread(post_outcomes, proxy, ids[2:], TOKEN)
            assert status == 200, text
            assert json.loads(text)["matched"] == 2
            assert outcomes_of(proxy)["matched"] == 4
    assert TOKEN not in caplog.text  # never logged
    assert "a bearer token (feedback.token_file)" in caplog.text


async def test_without_a_credential_feedback_is_closed_off_loopback_and_served_on_feedback_listen(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    own = free_port()
    async with model_server("production") as production:
        extra = f"listen: 0.0.0.0:0\nfeedback: {{listen: 127.0.0.1:{own}}}"
        async with running_proxy(watched_config(production, extra)) as proxy:
            ids = ["a", "b", "c"]
            await predicted(proxy, ids)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await report(proxy.grpc_port, ids)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "feedback.token_file" in caught.value.details()  # says how to open it
            assert outcomes_of(proxy)["matched"] == 0
            assert (await asyncio.to_thread(rejected, proxy))["closed"] == 1
            answer = await report(own, ids[:2])  # the loopback listener of its own
            assert answer.matched == 2
            # The admin endpoint is on loopback: POST /outcomes stays open there, as it was.
            status, text = await asyncio.to_thread(post_outcomes, proxy, ids[2:])
            assert status == 200, text
            assert outcomes_of(proxy)["matched"] == 3
    assert "is closed on 0.0.0.0:0" in caplog.text
    assert "feedback.listen" in caplog.text


async def test_a_loopback_listener_without_a_credential_serves_feedback_as_before():
    async with model_server("production") as production, running_proxy(watched_config(production)) as proxy:
        await predicted(proxy, ["x"])
        assert (await report(proxy.grpc_port, ["x"])).matched == 1


async def test_post_outcomes_on_a_networked_admin_endpoint_needs_a_credential(tmp_path):
    async with model_server("production") as production:
        config = watched_config(production, "admin: 0.0.0.0:0")
        async with running_proxy(config) as proxy:
            await predicted(proxy, ["x"])
            status, text = await asyncio.to_thread(post_outcomes, proxy, ["x"])
            assert status == 403, text
            assert "feedback.token_file" in text
            assert outcomes_of(proxy)["matched"] == 0
            assert (await asyncio.to_thread(rejected, proxy))["closed"] == 1


def test_the_gate_compares_every_token_and_names_reasons():
    counter = rejection_counter(CollectorRegistry())
    gate = FeedbackGate("0.0.0.0:1", ["one", "two"], ["CN=labeler"], counter, loopback=False)
    assert gate.refusal("Bearer two") is None
    assert gate.refusal("bearer one") is None
    assert gate.refusal(None, frozenset({"CN=labeler", "labeler"})) is None
    assert gate.refusal("Bearer three") == "wrong_token"
    assert gate.refusal("Basic one") == "missing"
    assert gate.refusal(None, frozenset({"CN=stranger"})) == "certificate"
    closed = FeedbackGate("0.0.0.0:1", [], [], counter, loopback=False)
    assert closed.refusal("Bearer one") == "closed"
    assert FeedbackGate("127.0.0.1:1", [], [], counter, loopback=True).refusal(None) is None
    assert counter.labels("wrong_token")._value.get() == 1
    assert counter.labels("closed")._value.get() == 1


def test_feedback_settings_are_read_from_the_config(tmp_path: Path):
    token = tmp_path / "t"
    token.write_text(TOKEN)
    config = parse_config(f"""
feedback: {{token_file: {token}, listen: 0.0.0.0:9999}}
upstreams: {{a: 127.0.0.1:1}}
routes: [{{match: {{}}, primary: a}}]
""")
    assert (config.feedback.token_file, config.feedback.listen) == (str(token), "0.0.0.0:9999")

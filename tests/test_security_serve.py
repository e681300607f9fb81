"""``mlmirror serve`` (supervisor, a worker, the observing process): Feedback is checked where it enters (the worker's
listener, the supervisor's admin), and the shadow the observing process copies to never sees the client's
credentials."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.protos import feedback_pb2

from loadtest.ports import free_port
from tests.support import EchoServer, http_get, model_server, wait_until
from tests.test_workers import polled, process_group

pytestmark = pytest.mark.slow

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/mlmirror.v1.Feedback/ReportOutcome"
TOKEN = "group-feedback-token"


def post(admin: int, ids: list[str], token: str | None) -> tuple[int, str]:
    body = json.dumps({"outcomes": [{"request_id": i, "labels": ["0"]} for i in ids]}).encode()
    return http_get(f"http://127.0.0.1:{admin}/outcomes", "POST", body, token=token)


def ground_truth(admin: int) -> dict:
    code, body = http_get(f"http://127.0.0.1:{admin}/status")
    assert code == 200, body
    return json.loads(body)["routes"][0]["drift"]["ground_truth"]


def matched(admin: int) -> int:
    return ground_truth(admin)["outcomes"]["matched"]


async def test_a_group_checks_feedback_where_it_enters_and_keeps_credentials_from_shadows(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    listen, admin = free_port(), free_port()
    async with model_server("production") as production, EchoServer("shadow") as shadow:
        config = tmp_path / "mlmirror.yaml"
        config.write_text(f"""
listen: 0.0.0.0:{listen}
admin: 127.0.0.1:{admin}
mirror_shed_lag: off
feedback: {{token_file: token}}
upstreams: {{production: 127.0.0.1:{production}, shadow: {shadow.address}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows: [{{upstream: shadow}}]
    drift: {{window: 100, capture: 100, ground_truth: {{output: probabilities}}}}
""")
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            rng = np.random.default_rng(3)
            ids = [f"call-{i}" for i in range(4)]
            metadata = (("authorization", "Bearer client-secret"), ("cookie", "s=1"), ("x-tenant", "acme"))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                infer = channel.unary_unary(MODEL_INFER)
                for i in ids:
                    await infer(infer_request(sample_features(rng, 1), request_id=i), metadata=metadata, timeout=10)
                await wait_until(lambda: len(shadow.received) == len(ids), within=60, what="the shadow copies")
                # the copies reach the shadow before, or after, the drift thread remembers the predictions
                await polled(lambda: {"pending": ground_truth(admin)["pending"]}, lambda g: g["pending"] == len(ids),
                             "the predictions remembered")  # fmt: skip
                for received in shadow.received:
                    assert "authorization" not in received.metadata
                    assert "cookie" not in received.metadata
                    assert received.metadata["x-tenant"] == "acme"

                request = feedback_pb2.ReportOutcomeRequest(
                    outcomes=[feedback_pb2.Outcome(request_id=i, labels=["0"]) for i in ids[:2]]
                ).SerializeToString()
                report = channel.unary_unary(REPORT)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await report(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                code, text = await asyncio.to_thread(post, admin, ids[2:], None)
                assert code == 401, text
                assert await asyncio.to_thread(matched, admin) == 0

                answer = await report(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
                assert feedback_pb2.ReportOutcomeResponse.FromString(answer).matched == 2
            code, text = await asyncio.to_thread(post, admin, ids[2:], TOKEN)
            assert code == 200, text
            assert json.loads(text)["matched"] == 2
            await polled(lambda: {"matched": matched(admin)}, lambda s: s["matched"] == 4, "all four joined")
            _, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/metrics")
            assert 'mlmirror_feedback_rejected_total{reason="missing"} 2.0' in metrics
        assert TOKEN not in (tmp_path / "group.log").read_text()

"""Triton's own GRPCInferenceService methods beyond KServe V2 through mlmirror: ModelConfig, RepositoryIndex,
ModelStatistics (unary, relayed as unknown methods) and the bidirectional ModelStreamInfer. Triton's messages come
from its grpc_service.proto as tritonclient ships it compiled (see servers.triton_descriptors)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.interop.harness import SERVICE, infer_request, load_messages, raw_call, running_mlmirror
from tests.interop.servers import Peer, triton_descriptors

CATCH_ALL = """\
upstreams:
  triton: {address: ADDRESS, health_check: {interval: 500ms, timeout: 2s}}
routes:
  - name: triton
    match: {}
    primary: triton
"""

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module")
def triton_messages(triton_peer: Peer) -> dict[str, type]:
    return load_messages(triton_descriptors(triton_peer.folder / "triton.fds"))


def message(messages: dict[str, type], type_name: str, **fields) -> bytes:
    return messages[f"inference.{type_name}"](**fields).SerializeToString()


def test_model_config_repository_index_and_statistics_pass_through(triton_peer: Peer, triton_messages, tmp_path):
    peer, m = triton_peer, triton_messages
    calls = [
        ("ModelConfig", message(m, "ModelConfigRequest", name=peer.model)),
        ("RepositoryIndex", message(m, "RepositoryIndexRequest", ready=True)),
        ("RepositoryIndex", message(m, "RepositoryIndexRequest")),
        ("ModelStatistics", message(m, "ModelStatisticsRequest", name=peer.model)),
        ("ModelStatistics", message(m, "ModelStatisticsRequest")),
    ]
    answers = {}
    config = CATCH_ALL.replace("ADDRESS", peer.primary.address)
    with (running_mlmirror(config, tmp_path) as mirror, grpc.insecure_channel(peer.primary.address) as direct,
          mirror.channel() as proxied):  # fmt: skip
        # Warm the statistics up first: a ModelInfer counts, a statistics request does not.
        raw_call(direct, SERVICE + "ModelInfer", infer_request(peer.model, np.ones((2, 4)), peer.input_name))
        for method, request in calls:
            expected, _ = raw_call(direct, SERVICE + method, request)
            got, trailers = raw_call(proxied, SERVICE + method, request)
            assert got == expected, method
            assert trailers["x-mlmirror-served-by"] == "triton"
            answers[method] = got
    config_answer = m["inference.ModelConfigResponse"].FromString(answers["ModelConfig"]).config
    assert config_answer.name == peer.model
    assert config_answer.backend == "python"
    assert [i.name for i in config_answer.input] == [peer.input_name]
    index = m["inference.RepositoryIndexResponse"].FromString(answers["RepositoryIndex"])
    assert [(model.name, model.state) for model in index.models] == [(peer.model, "READY")]
    stats = m["inference.ModelStatisticsResponse"].FromString(answers["ModelStatistics"])
    assert [s.name for s in stats.model_stats] == [peer.model]
    assert stats.model_stats[0].inference_count >= 1  # the warm-up call at least (one per request: no batching)


def test_model_stream_infer_passes_through(triton_peer: Peer, triton_messages, tmp_path: Path):
    peer, m = triton_peer, triton_messages
    rng = np.random.default_rng(9)
    requests = [infer_request(peer.model, rng.normal(size=(3, 4)), peer.input_name, raw=i % 2 == 0,
                              request_id=f"stream-{i}") for i in range(6)]  # fmt: skip
    method = SERVICE + "ModelStreamInfer"

    def stream(channel: grpc.Channel) -> list[bytes]:
        return list(channel.stream_stream(method)(iter(requests), timeout=60))

    config = CATCH_ALL.replace("ADDRESS", peer.primary.address)
    with running_mlmirror(config, tmp_path) as mirror:
        with grpc.insecure_channel(peer.primary.address) as direct:
            expected = stream(direct)
        with mirror.channel() as proxied:
            got = stream(proxied)
    assert got == expected
    assert len(got) == len(requests)
    answers = [m["inference.ModelStreamInferResponse"].FromString(b) for b in got]
    assert [a.error_message for a in answers] == [""] * len(requests)
    assert [a.infer_response.id for a in answers] == [f"stream-{i}" for i in range(len(requests))]
    assert all(a.infer_response.outputs[0].name == "probabilities" for a in answers)

"""mlmirror in front of each real model server (MLServer, Triton, KServe's ModelServer), run as subprocesses:
pass-through byte for byte, fallback when the primary is SIGKILLed under load, shadow agreement, drift against a
profile built from the training data, and ground truth joined by the client's request ids."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.interop.flows import (
    check_drift,
    drift_config,
    infer,
    offline_agreement,
    one_route,
    rows,
    send_all,
    shadow_window,
)
from tests.interop.harness import (
    INFER,
    SERVICE,
    Mlmirror,
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2,
    kserve_request,
    outputs_of,
    profile_build,
    raw_call,
    running_mlmirror,
)
from tests.interop.servers import Peer, wait_for

# --- 1, 2: pass-through ---------------------------------------------------------------------------------------

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_model_infer_answers_are_byte_identical_to_direct_calls(peer: Peer, tmp_path: Path):
    batches = rows(1, 5, 6)
    requests = [infer(peer, x, raw=raw, request_id=f"same-{i}") for i, x in enumerate(batches)
                for raw in (True, False)]  # fmt: skip
    with running_mlmirror(one_route(peer), tmp_path) as mirror:
        with grpc.insecure_channel(peer.primary.address) as direct, mirror.channel() as proxied:
            for request in requests:
                expected, _ = raw_call(direct, INFER, request)
                got, trailers = raw_call(proxied, INFER, request)
                assert got == expected
                assert trailers["x-mlmirror-served-by"] == "v1"
        # The answers hold real probabilities (not an error or an empty message that would trivially match).
        _, outputs = outputs_of(expected)
        assert outputs[peer.output].shape == (5, 3)
        assert np.allclose(outputs[peer.output].sum(axis=1), 1.0, atol=1e-5)


def test_health_and_metadata_calls_pass_through_unchanged(peer: Peer, tmp_path: Path):
    calls = [
        ("ServerLive", kserve_request("ServerLive")),
        ("ServerReady", kserve_request("ServerReady")),
        ("ServerMetadata", kserve_request("ServerMetadata")),
        ("ModelReady", kserve_request("ModelReady", name=peer.model)),
        ("ModelMetadata", kserve_request("ModelMetadata", name=peer.model)),
    ]
    config = one_route(peer).replace(f"match: {{model: {peer.model}}}", "match: {}")
    with (running_mlmirror(config, tmp_path) as mirror, grpc.insecure_channel(peer.primary.address) as direct,
          mirror.channel() as proxied):  # fmt: skip
        for method, request in calls:
            expected, _ = raw_call(direct, SERVICE + method, request)
            got, _ = raw_call(proxied, SERVICE + method, request)
            assert got == expected, method
    live = inference_pb2.ServerLiveResponse.FromString(raw_call_direct(peer, "ServerLive", calls[0][1]))
    ready = inference_pb2.ModelReadyResponse.FromString(raw_call_direct(peer, "ModelReady", calls[3][1]))
    metadata = inference_pb2.ModelMetadataResponse.FromString(raw_call_direct(peer, "ModelMetadata", calls[4][1]))
    assert live.live
    assert ready.ready
    assert metadata.name == peer.model
    assert [t.name for t in metadata.inputs] == [peer.input_name]


def raw_call_direct(peer: Peer, method: str, request: bytes) -> bytes:
    with grpc.insecure_channel(peer.primary.address) as channel:
        return raw_call(channel, SERVICE + method, request)[0]


# --- 3: the primary SIGKILLed under load ----------------------------------------------------------------------


def test_sigkill_of_the_primary_under_load_gives_no_client_error(peer: Peer, tmp_path: Path):
    total, clients = 600, 6
    batches = rows(3, 4, total)
    with peer.victim(f"{peer.kind}-victim") as victim:
        config = one_route(peer, primary=victim.address, fallback=peer.primary.address)
        with running_mlmirror(config, tmp_path) as mirror:
            done, errors, served = [], [], Counter()
            lock = threading.Lock()

            def client(k: int) -> None:
                with mirror.channel() as channel:
                    for i in range(k, total, clients):
                        try:
                            _, trailers = raw_call(channel, INFER, infer(peer, batches[i]), timeout=30)
                            with lock:
                                done.append(i)
                                served[trailers.get("x-mlmirror-served-by")] += 1
                        except grpc.RpcError as exc:
                            with lock:
                                errors.append((i, exc.code(), exc.details()))

            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for thread in threads:
                thread.start()
            try:
                # Kill once a third of the calls are answered: calls are in flight on the primary when it dies.
                wait_for(lambda: len(done) + len(errors) >= total // 3, 120, "a third of the calls")
                victim.process.kill()
            finally:
                for thread in threads:
                    thread.join(timeout=300)
            assert not any(t.is_alive() for t in threads)
            assert errors == []
            assert len(done) == total
            assert served["v1"] >= total // 3, served
            assert served["backup"] > 0, served
            assert set(served) == {"v1", "backup"}


# --- 4: a shadow of version 2 ---------------------------------------------------------------------------------


def test_shadow_agreement_equals_the_agreement_of_the_two_models_offline(peer: Peer, tmp_path: Path):
    batches = rows(4, 4, 150)
    extra = (f"    compare: {{classification: argmax, output: {peer.output}}}\n"
             "    promotion: {window: 10000, min_samples: 10}\n")  # fmt: skip
    with running_mlmirror(one_route(peer, extra, shadow=True), tmp_path) as mirror:
        send_all(mirror, peer, batches, "shadow")
        status = wait_for(lambda: shadow_window(mirror, peer, len(batches)), 120, "every copy compared")
    agree, n = offline_agreement(peer, batches)
    assert 0.5 < agree / n < 1.0, "the two versions should disagree on some rows, not on most"
    window = status["window"]
    assert window["samples"] == n
    assert window["agreement"] == round(agree / n, 6)
    assert status["comparisons"]["error"] == 0
    assert status["transport"] == "h2"  # the copies went over mlmirror's own HTTP/2 client, to the real server


# --- 5: drift against a profile built from the training data ---------------------------------------------------


def test_drift_flags_only_the_shifted_feature(peer: Peer, tmp_path: Path):
    profile = profile_build(peer.train, tmp_path / "profile.npz", "--input", peer.input_name)
    with running_mlmirror(drift_config(peer, profile, 50), tmp_path) as mirror:
        _, shifted = check_drift(peer, mirror)
    assert shifted["drifted"] == [f"{peer.input_name}[2]"]


def test_a_profile_from_a_bare_npy_binds_to_the_models_only_input(peer: Peer, tmp_path: Path):
    profile = profile_build(peer.train, tmp_path / "profile.npz")
    with running_mlmirror(drift_config(peer, profile, 50), tmp_path) as mirror:
        check_drift(peer, mirror)


# --- 6: ground truth joined by the client's request ids -------------------------------------------------------


def test_ground_truth_joins_outcomes_by_the_clients_request_ids(peer: Peer, tmp_path: Path):
    calls, n = 40, 3
    batches = rows(8, n, calls)
    extra = f"""\
    drift:
      window: 1000
      capture: 10
      outputs: []
      multivariate: off
      ground_truth: {{output: {peer.output}, window: {calls * n}}}
"""
    with running_mlmirror(one_route(peer, extra), tmp_path) as mirror:
        answers = send_all(mirror, peer, batches, "gt")
        wait_for(lambda: mirror.route(peer.kind)["drift"]["ground_truth"]["pending"] == calls, 60,
                 "every prediction stored", mirror.process)  # fmt: skip
        # The outcome of every fifth row is wrong: accuracy 0.8 exactly.
        outcomes, right = [], 0
        for i, answer in enumerate(answers):
            predicted = outputs_of(answer)[1][peer.output].argmax(axis=1)
            labels = []
            for j, p in enumerate(predicted):
                wrong = (i * n + j) % 5 == 0
                labels.append(str((p + 1) % 3 if wrong else p))
                right += not wrong
            outcomes.append((f"gt-{i}", labels))
        half = calls // 2
        by_http = mirror.post_outcomes([{"request_id": rid, "labels": labels} for rid, labels in outcomes[:half]])
        with mirror.channel() as channel:
            by_grpc = feedback_pb2_grpc.FeedbackStub(channel).ReportOutcome(
                feedback_pb2.ReportOutcomeRequest(outcomes=[feedback_pb2.Outcome(request_id=rid, labels=labels)
                                                            for rid, labels in outcomes[half:]]),
                timeout=30,
            )  # fmt: skip
        unknown = mirror.post_outcomes([{"request_id": "never-sent", "labels": ["0"] * n}])
        assert by_http["matched"] == half
        assert by_grpc.matched == calls - half
        assert (unknown["unknown"], unknown["early"]) == (0, 1)  # parked until feedback.early_ttl: it may come
        truth = wait_for(lambda: ground_truth_window(mirror, peer), 60, "the quality window")
    assert truth["rows"] == calls * n
    assert truth["metrics"]["accuracy"] == round(right / (calls * n), 6) == 0.8


def ground_truth_window(mirror: Mlmirror, peer: Peer) -> dict | None:
    latest = mirror.route(peer.kind)["drift"]["ground_truth"]["latest"]
    return latest[0] if latest else None

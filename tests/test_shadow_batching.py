"""Merged shadow copies (``batch``): the merge and the split against a naive numpy reference, and real gRPC shadows
on 127.0.0.1 whose merged answers compare exactly as each call's own answer does."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from mlmirror.config import parse_config
from mlmirror.demo.models import MODELS, ModelServicer, sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.errors import ConfigError
from mlmirror.handoff.tap import CallRecord
from mlmirror.looplag import LoopLag
from mlmirror.metrics import Metrics
from mlmirror.observing.shadows.batching import mergeable, merged_request, split
from mlmirror.observing.shadows.mergecheck import difference
from mlmirror.observing.shadows.mirror import RouteMirror, ShadowMirror
from mlmirror.observing.shadows.report import shadow_status
from mlmirror.protocol.kserve import Tensor, TensorError, request_inputs
from mlmirror.protocol.names import MODEL_INFER, REQUEST_ID
from mlmirror.protos import inference_pb2
from mlmirror.serving.upstream import UpstreamTarget

from tests.support import EchoServer, FunctionModel, wait_until

CONFIG = """
mirror_shed_lag: off
upstreams: {{production: 127.0.0.1:1, merged: {merged}, alone: {alone}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    compare: {{classification: argmax, output: probabilities}}
    shadows:
      - {{upstream: merged, batch: {batch}, batch_check: {check}, max_inflight: {inflight}, queue_size: 0,
         timeout: {timeout}}}
      - {{upstream: alone, queue_size: 1000, timeout: {timeout}}}
"""


def candidate(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """The demo candidate model's answer, as its server sends it (it disagrees with production on some rows)."""
    probabilities, labels = MODELS["candidate"].predict(x)
    return [("probabilities", "FP32", probabilities), ("label", "INT64", labels)]


def records(rows: list[int], seed: int = 0) -> list[CallRecord]:
    """Answered calls of ``rows[i]`` rows each, with production's own answers and per-call ids in the metadata."""
    rng = np.random.default_rng(seed)
    production = ModelServicer(MODELS["production"])
    out = []
    for i, n in enumerate(rows):
        request = infer_request(sample_features(rng, n), request_id=f"r{i}")
        answer = production.answer(inference_pb2.ModelInferRequest.FromString(request)).SerializeToString()
        metadata = ((REQUEST_ID, f"r{i}"), ("traceparent", f"00-{i:032x}-{i:016x}-01"), ("tenant", "a"))
        out.append(CallRecord("iris", MODEL_INFER, request, answer, grpc.StatusCode.OK, "production", "primary",
                              f"r{i}", metadata, time.time(), 0.001, 0.001))  # fmt: skip
    return out


@contextlib.asynccontextmanager
async def route_mirror(merged: str, alone: str, *, batch: int = 16, inflight: int = 4, copy_timeout: str = "5s",
                       check: int = 0) -> AsyncIterator[RouteMirror]:  # fmt: skip
    """The route mirror of ``CONFIG``: shadow ``merged`` (``batch``, ``batch_check: check``) and shadow ``alone``
    (each copy by itself)."""
    config = parse_config(
        CONFIG.format(merged=merged, alone=alone, batch=batch, inflight=inflight, timeout=copy_timeout, check=check)
    )
    route = config.routes[0]
    shadows = []
    for spec in route.shadows:
        target = UpstreamTarget(config.upstreams[spec.upstream], max_message_size=config.max_message_size,
                                metrics=Metrics())  # fmt: skip
        shadows.append(ShadowMirror(route.name, spec, target, route.compare, route.promotion, LoopLag(None)))
    mirror = RouteMirror(route.name, shadows, route.promotion)
    try:
        yield mirror
    finally:
        for shadow in shadows:
            shadow.close()
            await shadow.target.channel.close()


def accounted(shadow: ShadowMirror) -> int:
    """Copies finished, dropped, in flight or queued: every offered call is one of them."""
    stats = shadow.stats
    return sum(stats.results.values()) + sum(stats.drops.values()) + shadow.inflight + shadow.queued


def finished(shadow: ShadowMirror) -> int:
    return sum(shadow.stats.results.values()) + sum(shadow.stats.drops.values())


async def offer_in_one_pass(mirror: RouteMirror, calls: list[CallRecord]) -> None:
    """Offer ``calls`` without yielding to the event loop, so that the mirror dispatches them in one pass; then
    let that pass run."""
    for record in calls:
        mirror.offer(record)
    await asyncio.sleep(0)


# --- the merge and the split against numpy --------------------------------------------------------------------


def typed_request(values: dict[str, tuple[str, np.ndarray]], *, version: str = "", rid: str = "") -> bytes:
    """A ModelInferRequest carrying ``values`` (name -> (datatype, array)) as typed contents."""
    request = inference_pb2.ModelInferRequest(model_name="m", model_version=version, id=rid)
    fields = {"FP32": "fp32_contents", "INT64": "int64_contents", "BYTES": "bytes_contents"}
    for name, (datatype, array) in values.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        getattr(tensor.contents, fields[datatype]).extend(array.ravel().tolist())
    return request.SerializeToString()


def test_merged_raw_request_is_the_calls_rows_concatenated_in_order():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in (1, 8, 3, 0, 5)]
    copies = [mergeable(infer_request(x, request_id=f"r{i}"), ((REQUEST_ID, f"r{i}"),)) for i, x in enumerate(xs)]
    assert all(c is not None for c in copies)
    assert len({c.key for c in copies if c is not None}) == 1, "per-call ids do not keep copies apart"
    assert [c.rows for c in copies if c is not None] == [1, 8, 3, 0, 5]
    name, inputs = request_inputs(merged_request([c for c in copies if c is not None]))
    assert name == "iris"
    assert [t.name for t in inputs] == ["input"]
    assert inputs[0].shape == (17, 4)
    np.testing.assert_array_equal(inputs[0].values, np.concatenate(xs))


def test_merged_typed_request_concatenates_every_input():
    rng = np.random.default_rng(4)
    calls = []
    for n in (2, 1, 4):
        calls.append({
            "x": ("FP32", rng.normal(size=(n, 3)).astype(np.float32)),
            "ids": ("INT64", rng.integers(-(2**40), 2**40, size=(n,))),
            "text": ("BYTES", np.array([f"row {i}".encode() for i in range(n)], dtype=object)),
        })  # fmt: skip
    copies = [mergeable(typed_request(call, rid=f"r{i}"), ()) for i, call in enumerate(calls)]
    assert all(c is not None for c in copies)
    merged = request_inputs(merged_request([c for c in copies if c is not None]))[1]
    assert [t.shape for t in merged] == [(7, 3), (7,), (7,)]
    for tensor in merged:
        reference = np.concatenate([call[tensor.name][1] for call in calls])
        np.testing.assert_array_equal(tensor.values, reference)


def test_copies_merge_only_when_all_but_the_rows_agree():
    x = np.zeros((2, 4), np.float32)

    def key(request: bytes, metadata=()) -> object:
        found = mergeable(request, metadata)
        assert found is not None
        return found.key

    base = key(infer_request(x), ((REQUEST_ID, "a"), ("traceparent", "t1"), ("tenant", "a")))
    assert key(infer_request(np.ones((5, 4), np.float32)), ((REQUEST_ID, "b"), ("traceparent", "t2"),
                                                            ("tenant", "a"))) == base  # fmt: skip
    assert key(infer_request(x), (("tenant", "b"),)) != base, "other metadata keeps copies apart"
    assert key(infer_request(np.zeros((2, 5), np.float32))) != key(infer_request(x)), "another row shape"
    assert key(infer_request(x, model="other")) != key(infer_request(x))
    fp32 = {"x": ("FP32", x)}
    assert key(typed_request(fp32, version="2")) != key(typed_request(fp32, version="1"))
    assert key(typed_request(fp32)) != key(infer_request(x, model="m")), "typed and raw contents do not mix"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\xff\xff not protobuf",
        inference_pb2.ModelInferRequest(model_name="m").SerializeToString(),  # no inputs
        typed_request({"x": ("FP32", np.array(1.0, np.float32))}),  # rank 0: no rows
        typed_request({"x": ("FP32", np.zeros((2, 2), np.float32)), "y": ("FP32", np.zeros((3, 2), np.float32))}),
    ],
    ids=["malformed", "no_inputs", "rank_0", "rows_differ"],
)
def test_requests_that_cannot_merge_go_alone(request_bytes):
    assert mergeable(request_bytes, ()) is None


def test_incomplete_data_never_joins_a_merge():
    request = inference_pb2.ModelInferRequest.FromString(infer_request(np.zeros((2, 4), np.float32)))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]  # one FP32 short of its shape
    assert mergeable(request.SerializeToString(), ()) is None
    typed = inference_pb2.ModelInferRequest.FromString(typed_request({"x": ("FP32", np.zeros((2, 2), np.float32))}))
    typed.inputs[0].contents.fp32_contents.append(1.0)  # one value too many
    assert mergeable(typed.SerializeToString(), ()) is None
    raw_bytes = inference_pb2.ModelInferRequest(model_name="m")
    raw_bytes.inputs.add(name="t", datatype="BYTES", shape=[1])
    raw_bytes.raw_input_contents.append(b"\x01\x00\x00\x00a")
    assert mergeable(raw_bytes.SerializeToString(), ()) is None, "raw BYTES go alone"


def test_split_cuts_each_output_into_the_calls_rows():
    rng = np.random.default_rng(5)
    probabilities = rng.random((9, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=9)
    answer = inference_pb2.ModelInferResponse(model_name="m")
    answer.outputs.add(name="p", datatype="FP32", shape=[9, 3])
    answer.outputs.add(name="l", datatype="INT64", shape=[9])
    answer.raw_output_contents.extend([probabilities.tobytes(), labels.tobytes()])
    parts = split(answer.SerializeToString(), [2, 0, 7])
    bounds = [(0, 2), (2, 2), (2, 9)]
    for part, (start, end) in zip(parts, bounds, strict=True):
        assert [t.name for t in part] == ["p", "l"]
        assert part[0].shape == (end - start, 3)
        assert part[1].shape == (end - start,)
        np.testing.assert_array_equal(part[0].values, probabilities[start:end])
        np.testing.assert_array_equal(part[1].values, labels[start:end])
    with pytest.raises(TensorError) as caught:
        split(answer.SerializeToString(), [2, 8])
    assert caught.value.reason == "batch_split"


# --- real shadows ----------------------------------------------------------------------------------------------


async def settle(mirror: RouteMirror, calls: int) -> None:
    await wait_until(lambda: all(finished(s) == calls for s in mirror.shadows), 30.0, "every copy to finish")


async def test_merged_copies_compare_exactly_as_each_call_alone():
    rows = [int(n) for n in np.random.default_rng(6).integers(1, 9, size=50)]
    calls = records(rows)
    async with (
        FunctionModel(candidate) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=16, inflight=4, check=2) as mirror,
    ):
        await offer_in_one_pass(mirror, calls)
        assert all(accounted(s) == 50 for s in mirror.shadows)
        await settle(mirror, 50)
        together, apart = mirror.shadows
        await wait_until(lambda: sum(together.merge_check.counts.values()) == 2, 30.0, "the checks of requests 1, 3")
        assert together.merge_check.counts == {"same": 2, "differ": 0, "refused": 0, "failed": 0}
        assert together.merge_check.off is None
        assert merged.calls == math.ceil(50 / 16) + 2  # the merged requests, and one call alone for each check
        assert alone.calls == 50
        assert together.stats.merged == [4, 50]
        assert together.stats.results == apart.stats.results == {"OK": 50}
        assert together.stats.comparisons == apart.stats.comparisons
        assert together.stats.comparisons["mismatch"] > 0, "the candidate disagrees on some rows"
        a, b = together.summary(), apart.summary()
        assert (a.calls, a.samples, a.agreement) == (b.calls, b.samples, b.agreement) == (50, sum(rows), a.agreement)
        assert a.mae == pytest.approx(b.mae, rel=1e-12)
        assert a.abs_max == b.abs_max
        assert together.inflight == together.queued == 0


async def test_a_pass_never_merges_past_batch_nor_sends_past_max_inflight():
    calls = records([2] * 40)
    async with (
        FunctionModel(candidate) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=8, inflight=2) as mirror,
    ):
        await offer_in_one_pass(mirror, calls[:30])  # room: 2 free requests x 8 copies, no queue beyond
        together = mirror.shadows[0]
        assert together.stats.drops["queue_full"] == 14
        await settle(mirror, 30)
        assert merged.calls == 2
        assert together.stats.merged == [2, 16]
        assert together.stats.results == {"OK": 16}
        await offer_in_one_pass(mirror, calls[30:])
        await wait_until(lambda: finished(together) == 40, 30.0, "the second pass")
        assert merged.calls == 4
        assert together.stats.results == {"OK": 26}


async def test_an_answer_without_the_merged_rows_is_a_comparison_error_per_call():
    def summary_only(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        return [("probabilities", "FP32", np.ones((1, 3), np.float32)), ("label", "INT64", np.zeros(1, np.int64))]

    async with (
        FunctionModel(summary_only) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=16, inflight=4) as mirror,
    ):
        await offer_in_one_pass(mirror, records([3] * 10))
        await settle(mirror, 10)
        together = mirror.shadows[0]
        assert together.stats.results == {"OK": 10}
        assert together.stats.comparisons == {"match": 0, "mismatch": 0, "error": 10}
        assert together.stats.comparison_errors == {"batch_split": 10}
        assert together.summary().agreement == 0.0


async def test_a_dead_shadow_counts_each_merged_copy():
    async with (
        FunctionModel(candidate) as alone,
        route_mirror("127.0.0.1:1", alone.address, batch=16, inflight=4, copy_timeout="2s") as mirror,
    ):
        await offer_in_one_pass(mirror, records([1] * 40))
        await settle(mirror, 40)
        together = mirror.shadows[0]
        assert set(together.stats.results) == {"UNAVAILABLE"}
        assert together.stats.results["UNAVAILABLE"] == 40
        assert together.stats.merged == [3, 40]
        assert together.stats.comparisons == {"match": 0, "mismatch": 0, "error": 0}


async def test_closing_under_hung_copies_accounts_for_every_call():
    async with (
        EchoServer("hung", sleep=60.0) as hung,
        FunctionModel(candidate) as alone,
        route_mirror(hung.address, alone.address, batch=4, inflight=2, copy_timeout="30s") as mirror,
    ):
        together = mirror.shadows[0]
        await offer_in_one_pass(mirror, records([1] * 12))  # 8 copies in two requests; room for no more
        await wait_until(lambda: len(hung.received) == 2, 10.0, "two merged requests at the shadow")
        assert together.inflight == 8
        assert together.stats.drops["queue_full"] == 4
        assert together.queued == 0
        together.close()
        await wait_until(lambda: together.inflight == 0, 10.0, "the cancelled copies")
        assert together.stats.results == {"CANCELLED": 8}
        assert accounted(together) == 12


async def test_calls_of_another_shape_wait_their_turn_and_are_not_lost():
    rng = np.random.default_rng(7)
    production = ModelServicer(MODELS["production"])
    calls = records([2] * 6)
    odd = infer_request(rng.normal(size=(2, 4)).astype(np.float32), model="iris", request_id="odd")
    answer = production.answer(inference_pb2.ModelInferRequest.FromString(odd)).SerializeToString()
    other = CallRecord("iris", MODEL_INFER, odd, answer, grpc.StatusCode.OK, "production", "primary", "odd",
                       (("tenant", "b"),), time.time(), 0.001, 0.001)  # fmt: skip
    async with (
        FunctionModel(candidate) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=16, inflight=1) as mirror,
    ):
        await offer_in_one_pass(mirror, [*calls[:3], other, *calls[3:]])
        await settle(mirror, 7)
        together, apart = mirror.shadows
        assert merged.calls == 3, "three, then the other tenant's call alone, then three"
        assert together.stats.merged == [2, 6]
        assert together.stats.comparisons == apart.stats.comparisons


def tensors(**values: np.ndarray) -> list[Tensor]:
    kinds = {"f": "FP32", "i": "INT64", "O": "BYTES"}
    return [Tensor(name, kinds[v.dtype.kind], v.shape, v) for name, v in values.items()]


def test_a_merged_answer_differs_from_one_alone_only_beyond_float_noise_or_at_all_elsewhere():
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], np.float32)
    label = np.array([2, 2])
    assert difference(tensors(p=p, label=label), tensors(p=p.copy(), label=label.copy())) is None
    assert difference(tensors(p=p * (1 + 5e-5), label=label), tensors(p=p, label=label)) is None  # within rtol
    assert "'p'" in (difference(tensors(p=p * (1 + 1e-3), label=label), tensors(p=p, label=label)) or "")
    assert "'label'" in (difference(tensors(p=p, label=label + 1), tensors(p=p, label=label)) or "")
    shapes = difference(tensors(p=p[:1], label=label), tensors(p=p, label=label)) or ""
    assert "FP32 [2, 3] alone, FP32 [1, 3] merged" in shapes
    assert "outputs ['p'] alone" in (difference(tensors(p=p, label=label), tensors(p=p)) or "")
    text = np.array([b"a", b""], dtype=object)
    assert difference(tensors(t=text), tensors(t=text.copy())) is None
    assert difference(tensors(t=text), tensors(t=np.array([b"a", b"b"], dtype=object))) is not None


async def test_merging_stops_when_a_merged_answer_differs_from_the_call_alone():
    def batch_dependent(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        """Scores centred on the request's mean: a row's answer depends on the rows it arrives with."""
        z = x[:, :3] - x[:, :3].mean(axis=0)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return [("probabilities", "FP32", p.astype(np.float32)), ("label", "INT64", p.argmax(axis=1))]

    calls = records([2] * 48)
    async with (
        FunctionModel(batch_dependent) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=8, inflight=4, check=1) as mirror,
    ):
        together = mirror.shadows[0]
        await offer_in_one_pass(mirror, calls[:32])
        await settle(mirror, 32)
        await wait_until(lambda: together.merge_check.off is not None, 30.0, "a check to stop merging")
        assert together.stats.merged == [4, 32]
        assert 1 <= together.merge_check.counts["differ"] <= 4  # the requests answered before the first check ended
        assert together.merge_check.counts["same"] == together.merge_check.counts["failed"] == 0
        assert together.merge_check.counts["refused"] == 0
        assert "'probabilities'" in together.merge_check.off
        await wait_until(lambda: merged.calls == 4 + together.merge_check.counts["differ"], 30.0, "the checks")
        sent = merged.calls
        await offer_in_one_pass(mirror, calls[32:])
        await wait_until(lambda: finished(together) == 48, 30.0, "the copies after merging stopped")
        assert together.stats.merged == [4, 32]  # no request merged since
        assert merged.calls == sent + 16  # each copy alone, and no more checks
        assert together.stats.results == {"OK": 48}
        compared = together.stats.comparisons
        assert compared["match"] + compared["mismatch"] == 48
        assert compared["error"] == 0
        (entry,) = [e for e in shadow_status(mirror) if e["name"] == together.name]
        assert entry["merge_check"] == {"every": 1, **together.merge_check.counts, "stopped": together.merge_check.off}


@pytest.mark.parametrize("answer", ["refused", "uncut"])
async def test_merging_stops_when_the_shadow_refuses_or_mangles_merged_requests_but_answers_calls_alone(answer):
    """A shadow whose batch limit is 4 rows (it fails larger requests), or that answers a summary row whatever the
    rows it got: merged requests of 8 rows fail or cannot be cut, the call alone is answered, merging stops."""

    def limited(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        if x.shape[0] > 4:
            if answer == "refused":
                raise ValueError(f"batch of {x.shape[0]} rows over the limit of 4")
            return candidate(x[:1])
        return candidate(x)

    calls = records([2] * 8)
    async with (
        FunctionModel(limited) as merged,
        FunctionModel(candidate) as alone,
        route_mirror(merged.address, alone.address, batch=4, inflight=1, check=1) as mirror,
    ):
        together = mirror.shadows[0]
        await offer_in_one_pass(mirror, calls[:4])  # room for one merged request: 4 calls of 2 rows
        await wait_until(lambda: together.merge_check.off is not None, 30.0, "a check to stop merging")
        await wait_until(lambda: finished(together) == 4, 30.0, "the merged copies")
        result = "refused" if answer == "refused" else "differ"
        assert together.merge_check.counts == {"same": 0, "differ": 0, "refused": 0, "failed": 0, result: 1}
        assert ("UNKNOWN" if answer == "refused" else "batch_split") in together.merge_check.off
        assert merged.calls == 2  # the merged request and its first call alone
        await offer_in_one_pass(mirror, calls[4:])
        await wait_until(lambda: finished(together) == 8, 30.0, "the copies after merging stopped")
        assert together.stats.merged == [1, 4]  # no request merged since: each copy went alone
        assert merged.calls == 2 + 4
        assert together.stats.results == ({"UNKNOWN": 4, "OK": 4} if answer == "refused" else {"OK": 8})
        assert sum(together.stats.drops.values()) == 0


async def test_a_shadow_that_is_down_is_not_checked_for_merging():
    async with (
        FunctionModel(candidate) as alone,
        route_mirror("127.0.0.1:1", alone.address, batch=16, inflight=4, copy_timeout="2s", check=1) as mirror,
    ):
        await offer_in_one_pass(mirror, records([1] * 20))
        await settle(mirror, 20)
        together = mirror.shadows[0]
        assert together.stats.results == {"UNAVAILABLE": 20}
        assert together.merge_check.counts == {"same": 0, "differ": 0, "refused": 0, "failed": 0}
        assert together.merge_check.off is None


def test_batch_is_checked_with_file_line_and_key():
    base = "upstreams: {p: 127.0.0.1:1, s: 127.0.0.1:2}\nroutes:\n  - match: {}\n    primary: p\n    shadows:\n"
    assert parse_config(base + "      - {upstream: s, batch: 32}\n").routes[0].shadows[0].batch == 32
    assert parse_config(base + "      - {upstream: s}\n").routes[0].shadows[0].batch == 1
    with pytest.raises(ConfigError) as caught:
        parse_config(base + "      - {upstream: s, batch: 0}\n", "mlmirror.yaml")
    message = str(caught.value)
    assert "mlmirror.yaml:6" in message
    assert "batch" in message

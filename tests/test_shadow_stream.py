"""Shadow copies over one ModelStreamInfer stream (``transport: stream``): the same answers and comparisons as one
call per copy, copies that time out or lose their stream are counted, and production never notices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import MODELS, ModelServicer, sample_features, stream_response
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.shadows.stream import tag_request, untag_answer
from mlmirror.protocol.names import INFERENCE_SERVICE, MODEL_STREAM_INFER
from mlmirror.protos import inference_pb2

from tests.support import model_server, through_proxy, wait_until
from tests.test_shadows import MODEL_INFER, accounted, calls, features, shadow, shadow_status, steady


def test_a_tagged_request_reads_back_with_the_tag_as_its_id_and_nothing_else_changed():
    request = inference_pb2.ModelInferRequest.FromString(infer_request(np.ones((2, 4), np.float32), request_id="c1"))
    request.id = "the-client's-id"
    tagged = inference_pb2.ModelInferRequest.FromString(tag_request(request.SerializeToString(), "mlmirror-7"))
    assert tagged.id == "mlmirror-7"
    tagged.id = request.id
    assert tagged == request


def test_an_answer_gives_its_tag_its_response_and_its_error():
    response = inference_pb2.ModelInferResponse(model_name="iris", id="mlmirror-3")
    response.outputs.add(name="label", datatype="INT64", shape=[1])
    data = response.SerializeToString()
    assert untag_answer(stream_response(data)) == ("mlmirror-3", data, "")
    assert untag_answer(stream_response(data, "INVALID_ARGUMENT: bad shape")) == (
        "mlmirror-3", None, "INVALID_ARGUMENT: bad shape"
    )  # fmt: skip
    untagged = inference_pb2.ModelInferResponse(model_name="iris").SerializeToString()
    assert untag_answer(stream_response(untagged)) == (None, untagged, "")
    for garbage in (b"\x12\x05abc", b"\xff\xff", b"\x0a\x03err"):  # truncated; malformed; no infer_response
        with pytest.raises(ValueError, match="no infer_response"):
            untag_answer(garbage)


async def test_the_demo_servers_stream_answers_each_request_as_model_infer_does():
    rng = np.random.default_rng(1)
    async with model_server("candidate") as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        requests = [infer_request(features(rng), request_id=f"r{i}") for i in range(5)]
        wrong = inference_pb2.ModelInferRequest(model_name="iris", id="bad")
        wrong.inputs.add(name="input", datatype="FP32", shape=[1, 3])
        stream = channel.stream_stream(MODEL_STREAM_INFER)(iter([*requests, wrong.SerializeToString()]))
        answers = [untag_answer(message) async for message in stream]
        unary = [await channel.unary_unary(MODEL_INFER)(r) for r in requests]
    assert [answer for _, answer, _ in answers[:5]] == unary
    assert answers[5][0] == "bad"
    assert answers[5][1] is None
    assert answers[5][2].startswith("INVALID_ARGUMENT: input shape must be [n, 4]")


async def test_stream_copies_give_the_same_comparisons_as_one_call_per_copy():
    rng = np.random.default_rng(2)
    async with model_server("production") as production, model_server("candidate") as candidate:
        config = f"""
        upstreams:
          production: 127.0.0.1:{production}
          by_call: 127.0.0.1:{candidate}
          by_stream: 127.0.0.1:{candidate}
        routes:
          - match: {{model: iris}}
            primary: production
            compare: {{classification: argmax, output: probabilities}}
            shadows: [{{upstream: by_call}}, {{upstream: by_stream, transport: stream}}]
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, MODEL_INFER, [infer_request(sample_features(rng, 3)) for _ in range(300)])
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            for name in ("by_call", "by_stream"):
                await wait_until(lambda name=name: shadow(proxy, "iris", name).stats.results.get("OK", 0) == 300,
                                 what=f"{name}: 300 copies answered")  # fmt: skip
            by_call, by_stream = shadow_status(proxy, "iris", "by_call"), shadow_status(proxy, "iris", "by_stream")
            stream = shadow(proxy, "iris", "by_stream")._stream
            assert stream is not None
            assert stream.opened == 1  # 300 copies, one stream
    assert by_stream["mirrored"] == by_call["mirrored"] == {"OK": 300}
    for key in ("calls", "samples", "agreement", "mae", "rmse", "max_abs_error"):
        assert by_stream["window"][key] == by_call["window"][key], key
    assert by_stream["comparisons"] == by_call["comparisons"]
    assert by_stream["window"]["samples"] == 900
    assert 0.9 < by_stream["window"]["agreement"] < 1  # the candidate differs on ~2% of flowers: compared, not copied


class FlakyStreamServer:
    """ModelStreamInfer that answers like the candidate model, except: ``hang_after`` answers, then silence;
    ``end_after`` answers, then the stream ends (each new stream starts over)."""

    def __init__(self, *, hang_after: int | None = None, end_after: int | None = None) -> None:
        self.hang_after = hang_after
        self.end_after = end_after
        self.streams = 0
        self._model = ModelServicer(MODELS["candidate"])
        self._server = grpc.aio.server()
        self.port = 0

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        self.streams += 1
        answered = 0
        async for data in requests:
            if self.end_after is not None and answered >= self.end_after:
                return
            if self.hang_after is not None and answered >= self.hang_after:
                await asyncio.sleep(3600)
            request = inference_pb2.ModelInferRequest.FromString(data)
            yield stream_response(self._model.answer(request).SerializeToString())
            answered += 1

    async def __aenter__(self) -> FlakyStreamServer:
        handler = grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE, {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._stream)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._server.stop(None)


async def test_copies_on_a_hung_stream_time_out_and_a_stream_that_ends_is_reopened():
    rng = np.random.default_rng(3)
    async with (
        model_server("production") as production,
        FlakyStreamServer(hang_after=10) as hung,
        FlakyStreamServer(end_after=25) as ending,
    ):
        config = f"""
        upstreams:
          production: 127.0.0.1:{production}
          hung: {{address: 127.0.0.1:{hung.port}, circuit: {{codes: []}}}}
          ending: {{address: 127.0.0.1:{ending.port}, circuit: {{codes: []}}}}
        routes:
          - match: {{model: iris}}
            primary: production
            shadows:
              - {{upstream: hung, transport: stream, max_inflight: 8, queue_size: 1000, timeout: 300ms}}
              - {{upstream: ending, transport: stream, max_inflight: 1, queue_size: 1000, timeout: 30s}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(100)])
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            assert {a.trailers["x-mlmirror-served-by"] for a in answers} == {"production"}
            for name in ("hung", "ending"):
                await wait_until(lambda name=name: sum(shadow(proxy, "iris", name).stats.results.values()) == 100,
                                 within=120, what=f"{name}: every copy finished")  # fmt: skip
                assert accounted(proxy, "iris", name) == 100
            hung_results = shadow_status(proxy, "iris", "hung")["mirrored"]
            ending_results = shadow_status(proxy, "iris", "ending")["mirrored"]
            reopened = shadow(proxy, "iris", "ending")._stream
            assert reopened is not None
            opened = reopened.opened
    # The first 10 are answered (unless a busy machine made one wait past its 300 ms), the rest never are.
    assert set(hung_results) <= {"OK", "DEADLINE_EXCEEDED"}
    assert hung_results.get("OK", 0) <= 10
    assert hung_results["DEADLINE_EXCEEDED"] >= 90
    # One copy at a time: each stream answers 25, the 26th copy finds it ended (UNAVAILABLE), the next reopens.
    assert ending_results == {"OK": 97, "UNAVAILABLE": 3}
    assert opened == 4
    assert ending.streams == 4

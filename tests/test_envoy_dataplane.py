"""envoy/dataplane.yaml with the real Envoy binary: Envoy forwards to production and mirrors to the shadow itself,
and streams each call to mlmirror in observer mode over ext_proc; the observer's drift engine sees production
traffic, and neither a dead nor a hung observer fails or holds a call."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.extproc import SERVED_BY_UNKNOWN
from mlmirror.protocol.names import MODEL_INFER
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench_extproc import EXT_PROC_VARIANTS, FIVE, ext_proc_variant
from loadtest.envoy import DATAPLANE, load, on_ports
from loadtest.ports import free_port
from tests.support import FunctionModel, envoy_running, http_get, running_proxy, wait_until

pytestmark = pytest.mark.process  # starts Envoy


def iris_outputs(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """A fixed linear 'model': label = argmax of three scores of the petal length."""
    scores = np.stack([-x[:, 2], 0.1 * x[:, 0], x[:, 2] - 4.0], axis=1).astype(np.float32)
    return [("label", "INT64", scores.argmax(axis=1).astype(np.int64)), ("scores", "FP32", scores)]


def observer_config(production: FunctionModel) -> str:
    return f"""
    mode: observer
    mirror_shed_lag: off
    upstreams: {{production: {production.address}}}
    routes:
      - name: iris
        match: {{model: iris}}
        primary: production
        drift: {{window: 200, capture: 300, bins: 10}}
    """


def ext_proc_filter(config: dict) -> dict:
    """The ext_proc filter's typed config in an Envoy config of envoy/dataplane.yaml's shape."""
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


@contextlib.asynccontextmanager
async def dataplane(
    tmp: Path, production: int, shadow: int, observer: int, admin: int | None = None, *, ext_proc: dict | None = None
):
    """Envoy on envoy/dataplane.yaml, its clusters on the given ports (its admin on ``admin``, its ext_proc filter
    settings updated with ``ext_proc``); yields a client channel to it."""
    listen = free_port()
    clusters = {"production": [production], "shadow": [shadow], "mlmirror_observer": [observer]}
    config = on_ports(load(DATAPLANE), listen, admin or free_port(), clusters)
    ext_proc_filter(config).update(ext_proc or {})
    async with (
        envoy_running(config, tmp),
        grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel,
    ):
        yield channel


async def send(channel: grpc.aio.Channel, rng: np.random.Generator, n: int, shift: float = 0.0) -> list[float]:
    """``n`` ModelInfer calls, 16 at a time, all answered OK; returns their latencies (seconds)."""
    infer = channel.unary_unary(MODEL_INFER)
    limit = asyncio.Semaphore(16)
    latencies = []

    async def one(i: int) -> None:
        async with limit:
            started = asyncio.get_running_loop().time()
            await infer(infer_request(sample_features(rng, 2, shift=shift), request_id=f"{shift}-{i}"), timeout=10)
            latencies.append(asyncio.get_running_loop().time() - started)

    await asyncio.gather(*(one(i) for i in range(n)))
    return latencies


def scrape(port: int | None) -> dict[tuple[str, tuple], float]:
    code, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def test_envoy_carries_the_calls_mirrors_them_and_the_observer_sees_drift(tmp_path):
    rng = np.random.default_rng(3)
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(observer_config(production)) as observer,
        dataplane(tmp_path, production.port, shadow.port, observer.grpc_port) as channel,
    ):

        def drift() -> dict:
            return observer.status()["routes"][0]["drift"]

        await send(channel, rng, 300)  # the reference
        await send(channel, rng, 200)  # a window without drift
        await wait_until(lambda: drift()["history"], what="the first window")
        await send(channel, rng, 200, shift=1.5)  # petal length 1.5 cm longer
        await wait_until(lambda: len(drift()["history"]) == 2, what="the second window")
        await wait_until(lambda: shadow.calls == 700, what="Envoy's mirrored copies")

        assert production.calls == 700
        status = drift()
        assert status["calls"] == 700
        assert status["decode_errors"] == {}
        assert status["reference"]["rows"] == 600  # 300 calls of 2 rows
        first, second = status["history"]
        assert "input[2]" not in first["drifted"], first
        assert "input[2]" in second["drifted"], second
        assert second["calls"] == 200

        samples = await asyncio.to_thread(scrape, observer.admin_port)
        assert samples[("mlmirror_extproc_streams_total", (("outcome", "observed"),))] == 700
        assert observer.status()["routes"][0]["calls"] == {"OK": 700}
        assert samples[("mlmirror_extproc_active_streams", ())] >= 0

        # The observer takes no client calls itself: Envoy carries them.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{observer.grpc_port}") as direct:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await direct.unary_unary(MODEL_INFER)(infer_request(sample_features(rng, 1)), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_observer_labels_each_call_with_the_cluster_envoy_says_served_it(tmp_path):
    rng = np.random.default_rng(7)
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        # The observer's own name for the model differs from Envoy's cluster: who served must come from Envoy.
        running_proxy(observer_config(production).replace("{production:", "{model-a:").replace(
            "primary: production", "primary: model-a")) as observer,
        dataplane(tmp_path, production.port, shadow.port, observer.grpc_port) as channel,
    ):  # fmt: skip
        await send(channel, rng, 50)
        attempts = observer.metrics.routes["iris"].attempts
        await wait_until(lambda: sum(attempts.values()) == 50, what="50 observed calls")
        assert attempts == {("production", "primary", "OK"): 50}


async def test_with_request_headers_sent_and_no_attributes_who_served_is_the_documented_fallback(tmp_path):
    rng = np.random.default_rng(8)
    five_messages = ext_proc_variant(load(DATAPLANE), EXT_PROC_VARIANTS[FIVE])  # the data plane as it was
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(observer_config(production)) as observer,
    ):
        listen = free_port()
        clusters = {"production": [production.port], "shadow": [shadow.port], "mlmirror_observer": [observer.grpc_port]}
        async with (
            envoy_running(on_ports(five_messages, listen, free_port(), clusters), tmp_path),
            grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel,
        ):
            await send(channel, rng, 30)
            attempts = observer.metrics.routes["iris"].attempts
            await wait_until(lambda: sum(attempts.values()) == 30, what="30 observed calls")
        assert attempts == {(SERVED_BY_UNKNOWN, "primary", "OK"): 30}


async def test_the_observed_share_is_set_at_run_time_and_mirroring_goes_on(tmp_path):
    rng = np.random.default_rng(4)
    envoy_admin = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(observer_config(production)) as observer,
        dataplane(tmp_path, production.port, shadow.port, observer.grpc_port, envoy_admin) as channel,
    ):

        def observed() -> float:
            registry = observer.metrics.registry
            return registry.get_sample_value("mlmirror_extproc_streams_total", {"outcome": "observed"}) or 0.0

        def runtime(key: str, value: int) -> None:
            code, body = http_get(f"http://127.0.0.1:{envoy_admin}/runtime_modify?{key}={value}", "POST")
            assert code == 200, body

        await asyncio.to_thread(runtime, "mlmirror.observed_percent", 0)
        await send(channel, rng, 100)
        await wait_until(lambda: shadow.calls == 100, what="Envoy's mirrored copies")
        await asyncio.sleep(0.5)
        assert observed() == 0  # nothing streamed to the observer
        assert production.calls == 100

        await asyncio.to_thread(runtime, "mlmirror.observed_percent", 100)
        await send(channel, rng, 100)
        await wait_until(lambda: observed() == 100, what="every call observed again")
        await wait_until(lambda: shadow.calls == 200, what="Envoy's mirrored copies")


async def test_the_observer_sees_error_answers_with_their_status(tmp_path):
    def failing(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        raise ValueError("the model failed")

    async with (
        FunctionModel(failing) as production,
        FunctionModel(iris_outputs) as shadow,
        running_proxy(observer_config(production)) as observer,
        dataplane(tmp_path, production.port, shadow.port, observer.grpc_port) as channel,
    ):
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(infer_request(sample_features(np.random.default_rng(i), 1)), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNKNOWN
        await wait_until(lambda: observer.status()["routes"][0]["calls"].get("UNKNOWN") == 20,
                         what="the observer to count 20 failed calls")  # fmt: skip
        drift = observer.status()["routes"][0]["drift"]
        assert drift["history"] == []  # failed calls carry no prediction: no window
        samples = await asyncio.to_thread(scrape, observer.admin_port)
        assert samples[("mlmirror_extproc_streams_total", (("outcome", "observed"),))] == 20


async def test_a_dead_observer_fails_no_call(tmp_path):
    rng = np.random.default_rng(5)
    nothing_listens = free_port()
    async with (
        FunctionModel(iris_outputs) as production,
        FunctionModel(iris_outputs) as shadow,
        dataplane(tmp_path, production.port, shadow.port, nothing_listens) as channel,
    ):
        await send(channel, rng, 100)
        assert production.calls == 100
        await wait_until(lambda: shadow.calls == 100, what="the mirrored copies")


class HungProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    """An ext_proc server that accepts each stream and never reads from it nor answers."""

    def __init__(self) -> None:
        self.streams = 0

    async def Process(self, request_iterator, context):  # noqa: N802 - gRPC method name
        self.streams += 1
        await asyncio.Event().wait()  # until the server stops


#: How long Envoy would wait for each answer of a processor it waits for: far beyond the calls' 10 s deadline, so a
#: call that waited fails, however fast or slow the machine.
HUNG_MESSAGE_TIMEOUT = "120s"


async def test_a_hung_observer_holds_no_call(tmp_path):
    rng = np.random.default_rng(6)
    hung = HungProcessor()
    server = grpc.aio.server()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(hung, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with (
            FunctionModel(iris_outputs) as production,
            FunctionModel(iris_outputs) as shadow,
            dataplane(
                tmp_path, production.port, shadow.port, port, ext_proc={"message_timeout": HUNG_MESSAGE_TIMEOUT}
            ) as channel,  # fmt: skip
        ):
            await send(channel, rng, 100)  # every call answered OK within 10 s: none waited for the observer
            assert production.calls == 100
            # Envoy streams every call to it; a stream may reach the observer after its call has been answered.
            await wait_until(lambda: hung.streams >= 100, 60, "Envoy to open a stream to the observer per call")
    finally:
        await server.stop(0)

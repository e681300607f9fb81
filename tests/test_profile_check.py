"""A drift profile that does not fit the model's declared inputs (KServe ModelMetadata) stops the proxy's start,
saying what differs; one that fits starts; a model that cannot be asked is logged, not fatal."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import Drift, parse_config
from mlmirror.demo.models import MODELS, ModelServicer, sample_features
from mlmirror.errors import StartError
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.profile_build import build_profile
from mlmirror.observing.drift.reference import Reference
from mlmirror.protos import inference_pb2, inference_pb2_grpc
from mlmirror.runtime.proxy import Proxy

from tests.support import feed_calls, fp64_call, model_server, through_proxy, wait_until


def profile(tmp_path: Path, columns: int, input_name: str = "input", text: bool = False) -> Path:
    data = tmp_path / "ref.npy"
    values = np.random.default_rng(0).normal(size=(200, columns))
    np.save(data, values.astype(str) if text else values)
    out = tmp_path / f"profile-{input_name}-{columns}-{text}.npz"
    build_profile(data, out, bins=5, model="iris", version="1", input_name=input_name, names=None)
    return out


def config(port: int, path: Path) -> str:
    return f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams: {{production: 127.0.0.1:{port}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    drift: {{profile: {path}}}
"""


@pytest.mark.parametrize(
    ("columns", "input_name", "text", "message"),
    [
        (6, "input", False, "input[4]: column 4, but input 'input' has 4"),
        (4, "features", False, "the model has no input 'features' (it has ['input'])"),
        (4, "input", True, "input[0]: categorical in the profile, but input 'input' is FP32"),
    ],
    ids=["too-wide", "wrong-tensor", "wrong-kind"],
)
async def test_a_profile_that_does_not_fit_the_model_stops_the_start(tmp_path, columns, input_name, text, message):
    async with model_server("production") as port:
        proxy = Proxy(parse_config(config(port, profile(tmp_path, columns, input_name, text))))
        with pytest.raises(StartError) as caught:
            await proxy.start()
    assert "route iris: profile" in str(caught.value)
    assert "does not fit the inputs of production" in str(caught.value)
    assert message in str(caught.value)


async def test_a_profile_that_fits_starts_and_an_unreachable_model_is_only_logged(tmp_path, caplog):
    good = profile(tmp_path, 4)
    async with model_server("production") as port:
        proxy = Proxy(parse_config(config(port, good)))
        await proxy.start()
        assert proxy.status()["routes"][0]["drift"]["reference"]["rows"] == 200
        await proxy.stop(grace=0)
    with caplog.at_level(logging.WARNING, logger="mlmirror.runtime.proxy"):
        proxy = Proxy(parse_config(config(1, good)))  # nothing listens on port 1
        await proxy.start()
        await proxy.stop(grace=0)
    assert any("cannot check profile" in record.getMessage() for record in caplog.records)


# --- profiles that name no input, and models that declare none ----------------------------------------------------

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
TensorMetadata = inference_pb2.ModelMetadataResponse.TensorMetadata


class DeclaringServicer(ModelServicer):
    """The demo production model (it reads its one input whatever its name), declaring ``inputs`` in its metadata:
    none, as MLServer does when the model's settings list none; or inputs named as other servers name them."""

    def __init__(self, inputs: list[str]) -> None:
        super().__init__(MODELS["production"])
        self.inputs = inputs

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
        declared = await super().ModelMetadata(request, context)
        del declared.inputs[:]
        declared.inputs.extend(TensorMetadata(name=name, datatype="FP32", shape=[-1, 4]) for name in self.inputs)
        return declared


@contextlib.asynccontextmanager
async def declaring_model(inputs: list[str]) -> AsyncIterator[int]:
    """A real KServe V2 server on 127.0.0.1 declaring ``inputs``; yields its port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(DeclaringServicer(inputs), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def iris_profile(tmp_path: Path, input_name: str | None = None) -> Path:
    """A profile of iris-like features from a bare [rows, 4] array, naming input ``input_name`` (None: none)."""
    data = tmp_path / "iris.npy"
    np.save(data, sample_features(np.random.default_rng(0), 2000).astype(np.float64))
    out = tmp_path / f"iris-{input_name}.npz"
    build_profile(data, out, bins=8, model="iris", version="1", input_name=input_name)
    return out


def legacy(profile_path: Path) -> Path:
    """``profile_path`` as a profile of revision 1 wrote it: no revision, the unnamed input recorded as "input"."""
    with np.load(profile_path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(str(arrays["header"]))
    del header["revision"]
    header["series"] = [[name, kind, tensor or "input", *rest] for name, kind, tensor, *rest in header["series"]]
    arrays["header"] = np.array(json.dumps(header))
    out = profile_path.with_name("legacy-" + profile_path.name)
    with open(out, "wb") as file:
        np.savez(file, **arrays)
    return out


def watched_config(port: int, path: Path) -> str:
    return config(port, path).replace(f"drift: {{profile: {path}}}", f"drift: {{profile: {path}, window: 20}}")


def named_request(x: np.ndarray, name: str) -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request.SerializeToString()


async def windows_from(proxy: Proxy, channel: grpc.aio.Channel, name: str, calls: int = 40) -> dict:
    """Send ``calls`` iris calls with input ``name`` through ``proxy``; its drift status once they are windowed."""
    rng = np.random.default_rng(1)
    infer = channel.unary_unary(MODEL_INFER)
    for _ in range(calls):
        await infer(named_request(sample_features(rng, 2), name), timeout=10)

    def drift() -> dict:
        return proxy.status()["routes"][0]["drift"]

    await wait_until(lambda: drift()["calls"] == calls and drift()["queued"] == 0, 30, "the calls to be windowed")
    await wait_until(lambda: len(drift()["history"]) == calls // 20, 30, "the windows to close")
    return drift()


def watched_inputs(proxy: Proxy) -> set[str | None]:
    schema = proxy.parts.get("iris", "drift").engine.schema
    assert schema is not None
    return {series.tensor for series in schema.series}


async def test_a_model_that_declares_no_inputs_is_warned_about_once_and_drift_starts(tmp_path, caplog):
    """MLServer's metadata when the model settings declare no inputs: the proxy used to refuse to start ("the
    model has no input 'input-0' (it has [])")."""
    path = iris_profile(tmp_path, "input-0")
    async with declaring_model([]) as port:
        with caplog.at_level(logging.WARNING):
            async with through_proxy(watched_config(port, path)) as (proxy, channel):
                drift = await windows_from(proxy, channel, "input-0")
    warnings = [r.getMessage() for r in caplog.records if "declares no inputs" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "route iris: the model declares no inputs in its metadata" in warnings[0]
    assert drift["decode_errors"] == {}
    assert [w["calls"] for w in drift["history"]] == [20, 20]


@pytest.mark.parametrize("name", ["input-0", "x", "INPUT0"])
async def test_a_profile_that_names_no_input_binds_to_the_only_input_the_model_declares(tmp_path, name):
    path = iris_profile(tmp_path)
    assert {s.tensor for s in Reference.load(path).schema.series} == {None}
    async with declaring_model([name]) as port, through_proxy(watched_config(port, path)) as (proxy, channel):
        assert watched_inputs(proxy) == {name}  # bound at start-up, before any call
        drift = await windows_from(proxy, channel, name)
    assert drift["decode_errors"] == {}
    assert [w["calls"] for w in drift["history"]] == [20, 20]
    assert drift["reference"]["series"] == [f"input[{i}]" for i in range(4)]


async def test_a_profile_that_names_no_input_binds_from_the_first_call_when_the_metadata_says_nothing(tmp_path):
    path = iris_profile(tmp_path)
    async with declaring_model([]) as port, through_proxy(watched_config(port, path)) as (proxy, channel):
        assert watched_inputs(proxy) == {None}
        drift = await windows_from(proxy, channel, "input-0")
        assert watched_inputs(proxy) == {"input-0"}
    assert drift["decode_errors"] == {}
    assert [w["calls"] for w in drift["history"]] == [20, 20]


async def test_a_profile_that_names_no_input_stops_the_start_when_the_model_has_several(tmp_path):
    path = iris_profile(tmp_path)
    async with declaring_model(["features", "mask"]) as port:
        proxy = Proxy(parse_config(watched_config(port, path)))
        with pytest.raises(StartError) as caught:
            await proxy.start()
    assert "route iris: profile" in str(caught.value)
    assert "the model has 2 inputs: features, mask; build the profile with --input NAME" in str(caught.value)


@pytest.mark.parametrize(("declared", "bound"), [(["x"], "x"), (["other", "input"], "input")])
async def test_an_old_profile_recorded_input_binds_to_the_only_input_or_to_input(tmp_path, declared, bound):
    path = legacy(iris_profile(tmp_path))
    reference = Reference.load(path)
    assert reference.preferred_input == "input"
    async with declaring_model(declared) as port, through_proxy(watched_config(port, path)) as (proxy, channel):
        assert watched_inputs(proxy) == {bound}
        drift = await windows_from(proxy, channel, bound)
    assert drift["decode_errors"] == {}


async def test_an_old_profile_of_a_named_input_still_stops_the_start_when_the_model_lacks_it(tmp_path):
    path = legacy(iris_profile(tmp_path, "features"))
    assert {s.tensor for s in Reference.load(path).schema.series} == {"features"}  # a given name stays a name
    async with declaring_model(["x"]) as port:
        proxy = Proxy(parse_config(watched_config(port, path)))
        with pytest.raises(StartError) as caught:
            await proxy.start()
    assert "the model has no input 'features' (it has ['x'])" in str(caught.value)


def test_calls_with_several_inputs_leave_an_unnamed_profile_unbound_and_are_counted(tmp_path, caplog):
    engine = DriftEngine("m", Drift(profile=str(tmp_path / "p.npz"), window=10), Reference.load(iris_profile(tmp_path)))
    two = inference_pb2.ModelInferRequest(model_name="m")
    for name in ("a", "b"):
        two.inputs.add(name=name, datatype="FP64", shape=[1, 4])
        two.raw_input_contents.append(np.zeros((1, 4), "<f8").tobytes())
    one = fp64_call(np.ones((1, 4)))
    with caplog.at_level(logging.WARNING):
        feed_calls(engine, [dataclasses.replace(one, request=two.SerializeToString())] * 5)
        engine.drain()
    assert engine.decode_errors == {"ambiguous_input": 5}
    assert [r.getMessage().count("2 inputs: a, b") for r in caplog.records] == [1]  # logged once, not per call
    feed_calls(engine, [one] * 10)  # fp64_call's single input is named "input"
    engine.drain()
    assert {s.tensor for s in engine.schema.series} == {"input"}
    assert engine.windows == {("m", "1"): 1}

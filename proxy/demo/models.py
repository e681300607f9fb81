"""Small numpy models served over KServe V2 gRPC: the demo's model servers, and real upstreams for tests.

All three classify iris-like flowers from four FP32 features (sepal length, sepal width, petal length, petal width,
in cm) into three classes:

- ``production``: linear discriminant with the class means of Fisher's iris data;
- ``candidate``: the same discriminant retrained with a prior that leans towards virginica, so it disagrees with
  production on about 2% of flowers (at the versicolor/virginica boundary);
- ``baseline``: a constant answer (the class prior), for when nothing better is up.

Each answers ModelInfer with ``probabilities`` (FP32, [n, 3]) and ``label`` (INT64, [n]) as raw output contents,
echoing the request id, and implements the other KServe V2 methods.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import numpy as np
from mlmirror.protos import inference_pb2, inference_pb2_grpc

__all__ = ["CLASS_MEANS", "DemoModel", "MODELS", "ModelServicer", "sample_features", "serve_model"]

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")

#: Class means (cm) of Fisher's iris data, rows in CLASSES order, columns in FEATURES order.
CLASS_MEANS = np.array(
    [[5.006, 3.428, 1.462, 0.246], [5.936, 2.770, 4.260, 1.326], [6.588, 2.974, 5.552, 2.026]], dtype=np.float64
)
_CLASS_STD = np.array([0.35, 0.35, 0.45, 0.2])


def sample_features(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """``rows`` iris-like samples (FP32, [rows, 4]) from the three classes in equal shares; ``shift`` (cm) is added
    to the petal length, to simulate drifting inputs."""
    classes = rng.integers(0, 3, size=rows)
    x = CLASS_MEANS[classes] + rng.normal(size=(rows, 4)) * _CLASS_STD
    x[:, 2] += shift
    return x.astype(np.float32)


@dataclass(frozen=True)
class DemoModel:
    """A discriminant over standardized features (log-prior ``bias`` added to its logits), or a constant answer
    when ``means`` is None."""

    name: str
    version: str
    means: np.ndarray | None
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    constant: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities FP32 [n, 3], labels INT64 [n]) for features ``x`` of shape [n, 4]."""
        if self.means is None:
            probabilities = np.tile(np.asarray(self.constant, dtype=np.float32), (len(x), 1))
        else:
            z = (x.astype(np.float64)[:, None, :] - self.means[None, :, :]) / _CLASS_STD
            logits = -0.5 * (z**2).sum(axis=2) + np.asarray(self.bias)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probabilities = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return probabilities, probabilities.argmax(axis=1).astype(np.int64)


MODELS = {
    "production": DemoModel("iris", "1", CLASS_MEANS),
    "candidate": DemoModel("iris", "2", CLASS_MEANS, bias=(0.0, 0.0, 5.0)),
    "baseline": DemoModel("iris", "baseline", None),
}


class ModelServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe V2 server for one ``DemoModel``, answering to the model's name, any of ``aliases``, or no name."""

    def __init__(self, model: DemoModel, *, aliases: tuple[str, ...] = (), server_name: str = "mlmirror-demo") -> None:
        self.model = model
        self.names = frozenset(("", model.name, *aliases))
        self.server_name = server_name
        self.calls = 0

    async def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return inference_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # noqa: N802
        return inference_pb2.ModelReadyResponse(ready=request.name in self.names)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return inference_pb2.ServerMetadataResponse(name=self.server_name, version="1", extensions=[])

    async def ModelMetadata(self, request, context):  # noqa: N802
        if request.name not in self.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request.name))
        tensor = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=self.model.name,
            versions=[self.model.version],
            platform="numpy",
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, 4])],
            outputs=[
                tensor(name="probabilities", datatype="FP32", shape=[-1, 3]),
                tensor(name="label", datatype="INT64", shape=[-1]),
            ],
        )

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return self.answer(request)
        except RefusedError as exc:
            await context.abort(exc.code, exc.message)

    def answer(self, request: inference_pb2.ModelInferRequest) -> inference_pb2.ModelInferResponse:
        """The model's answer to ``request``; raises ``RefusedError`` (a gRPC code and why)."""
        self.calls += 1
        if request.model_name not in self.names:
            raise RefusedError(grpc.StatusCode.NOT_FOUND, self._unknown(request.model_name))
        x = _features(request)
        probabilities, labels = self.model.predict(x)
        rows = len(x)
        response = inference_pb2.ModelInferResponse(
            model_name=self.model.name, model_version=self.model.version, id=request.id
        )
        response.outputs.add(name="probabilities", datatype="FP32", shape=[rows, 3])
        response.outputs.add(name="label", datatype="INT64", shape=[rows])
        response.raw_output_contents.extend([probabilities.tobytes(), labels.tobytes()])
        return response

    def _unknown(self, name: str) -> str:
        return f"unknown model {name!r}; this server has {self.model.name!r}"


class RefusedError(Exception):
    """A request the model refuses: the gRPC ``code`` and ``message`` to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _features(request: inference_pb2.ModelInferRequest) -> np.ndarray:
    """The [n, 4] FP32 input, raw or typed; raises ``RefusedError`` (INVALID_ARGUMENT) with the reason otherwise."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if len(request.inputs) != 1:
        raise RefusedError(invalid, f"expected 1 input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    shape = tuple(tensor.shape)
    if len(shape) != 2 or shape[1] != 4 or not 1 <= shape[0] <= 65536:
        raise RefusedError(invalid, f"input shape must be [n, 4] with n >= 1, got {list(shape)}")
    dtype = {"FP32": np.float32, "FP64": np.float64}.get(tensor.datatype)
    if dtype is None:
        raise RefusedError(invalid, f"input datatype must be FP32 or FP64, got {tensor.datatype}")
    count = shape[0] * 4
    if request.raw_input_contents:
        raw = request.raw_input_contents[0]
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise RefusedError(
                invalid,
                f"raw input has {len(raw)} bytes, shape {list(shape)} of {tensor.datatype} needs "
                f"{count * np.dtype(dtype).itemsize}",
            )
        values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        field = tensor.contents.fp32_contents if dtype is np.float32 else tensor.contents.fp64_contents
        if len(field) != count:
            raise RefusedError(invalid, f"{len(field)} values for shape {list(shape)}")
        values = np.asarray(field, dtype=dtype)
    return values.reshape(shape[0], 4).astype(np.float32)


async def serve_model(
    model: DemoModel, address: str = "127.0.0.1:0", *, aliases: tuple[str, ...] = ()
) -> tuple[grpc.aio.Server, int]:
    """Start a KServe V2 server for ``model`` on ``address``; returns the started server and its port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = ModelServicer(model, aliases=aliases)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def serve_forever(name: str, address: str) -> None:
    """Serve the named demo model until cancelled (``mlmirror model-server``)."""
    server, port = await serve_model(MODELS[name], address)
    print(f"demo model {name!r} ({MODELS[name].name} v{MODELS[name].version}) on port {port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(None)
        await asyncio.sleep(0)

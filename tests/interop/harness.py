"""The interop suite's one contact with mlmirror's code: the compiled KServe V2 and Feedback stubs, and mlmirror
run as a subprocess through its console script (``mlmirror serve``, ``mlmirror profile build``), read over its
admin HTTP endpoint. Every import of an mlmirror module is in this file, so a renamed package is one edit here."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, message_factory
from mlmirror.protos import feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc

from tests.interop.servers import Process, free_port, wait_for

__all__ = [
    "INFER",
    "SERVICE",
    "Mlmirror",
    "feedback_pb2",
    "feedback_pb2_grpc",
    "inference_pb2",
    "inference_pb2_grpc",
    "infer_request",
    "kserve_request",
    "load_messages",
    "mlmirror_command",
    "outputs_of",
    "profile_build",
    "raw_call",
    "running_mlmirror",
]

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"


def mlmirror_command() -> list[str]:
    """The ``mlmirror`` console script of the venv running the tests."""
    script = Path(sys.executable).parent / "mlmirror"
    if not script.exists():
        raise RuntimeError(f"no mlmirror console script beside {sys.executable}: pip install -e . first")
    return [str(script)]


def http(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Mlmirror:
    """A running ``mlmirror serve``: its gRPC address, admin URL and log."""

    process: Process
    listen: str
    admin: str

    def status(self) -> dict:
        code, body = http(f"{self.admin}/status")
        assert code == 200, body
        return json.loads(body)

    def route(self, name: str) -> dict:
        return next(r for r in self.status()["routes"] if r["name"] == name)

    def shadow(self, route: str, name: str) -> dict:
        return next(s for s in self.route(route)["shadows"] if s["name"] == name)

    def metrics(self) -> str:
        code, body = http(f"{self.admin}/metrics")
        assert code == 200, body
        return body

    def post_outcomes(self, outcomes: list[dict]) -> dict:
        code, body = http(f"{self.admin}/outcomes", "POST", json.dumps({"outcomes": outcomes}).encode())
        assert code == 200, body
        return json.loads(body)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.listen, options=[("grpc.max_receive_message_length", 2**26)])


def _ready(admin: str) -> bool:
    try:
        return http(f"{admin}/readyz")[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_mlmirror(config: str, folder: Path, name: str = "mlmirror", within: float = 120.0) -> Iterator[Mlmirror]:
    """``mlmirror serve`` on ``config`` (YAML without ``listen``/``admin``: both get free loopback ports), ready
    (``/readyz`` 200) before it yields; killed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path = folder / f"{name}.yaml"
    path.write_text(f"listen: {listen}\nadmin: {admin}\nmirror_shed_lag: off\nshutdown_grace: 1s\n"
                    + textwrap.dedent(config))  # fmt: skip
    with Process.start(name, [*mlmirror_command(), "serve", "--config", str(path)], folder) as process:
        url = f"http://{admin}"
        wait_for(lambda: _ready(url), within, f"{name} to be ready", process)
        yield Mlmirror(process, listen, url)


def profile_build(data: Path, out: Path, *args: str) -> Path:
    """``mlmirror profile build --data DATA --out OUT ARGS...``; returns ``out``."""
    done = subprocess.run([*mlmirror_command(), "profile", "build", "--data", str(data), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def infer_request(model: str, x: np.ndarray, input_name: str, *, raw: bool = True, request_id: str = "",
                  outputs: Sequence[str] = ()) -> bytes:  # fmt: skip
    """A serialized ModelInferRequest with one FP32 input ``x``: in ``raw_input_contents`` or in typed
    ``contents.fp32_contents``."""
    request = inference_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(np.asarray(x, dtype=np.float32).ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


_DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}
_TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}


def outputs_of(response: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """(model_version, {output name: array}) of a serialized ModelInferResponse."""
    message = inference_pb2.ModelInferResponse.FromString(response)
    arrays = {}
    for i, tensor in enumerate(message.outputs):
        shape = tuple(tensor.shape)
        if i < len(message.raw_output_contents):
            values = np.frombuffer(message.raw_output_contents[i], dtype=_DTYPES[tensor.datatype])
        else:
            values = np.asarray(getattr(tensor.contents, _TYPED[tensor.datatype]))
        arrays[tensor.name] = values.reshape(shape)
    return message.model_version, arrays


def raw_call(channel: grpc.Channel, method: str, request: bytes, *, metadata: Sequence[tuple[str, str]] = (),
             timeout: float = 30.0) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """One unary call with bytes in and out: (response bytes, trailing metadata)."""
    response, call = channel.unary_unary(method).with_call(request, timeout=timeout, metadata=tuple(metadata))
    return response, dict(call.trailing_metadata() or ())


def kserve_request(method: str, **fields) -> bytes:
    """A serialized request of KServe V2 method ``method`` (``ServerLive``, ``ModelReady``, ...)."""
    return getattr(inference_pb2, f"{method}Request")(**fields).SerializeToString()


def load_messages(descriptor_set: Path) -> dict[str, type]:
    """Message classes (by full name) from a serialized FileDescriptorSet, in a pool of their own, so that
    another ``inference`` package (Triton's) does not clash with mlmirror's."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    return message_factory.GetMessages(files)

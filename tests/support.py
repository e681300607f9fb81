"""Real gRPC servers and proxies on 127.0.0.1 for the tests. Nothing here mocks gRPC.

``EchoServer`` is a small grpc.aio server with one method per call type; what it does on a call is set on the
server object (``fail_with``, ``sleep``) or, for pass-through tests, by the request's metadata:

    x-test-code: NAME       end the call with that status (details "echo failure"); Bidi reads its requests first
    x-test-sleep: SECONDS   wait before answering
    x-test-initial: VALUE   send initial metadata x-initial: VALUE
    x-test-messages: N      ServerStream/Bidi: how many response messages (default 3)

It always sends trailing metadata ``x-trailer: <server name>`` and a binary ``x-trailer-bin``, and records every
call it receives (method, request bytes, metadata, time remaining).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import parse_config
from mlmirror.demo.models import MODELS, sample_features, serve_model
from mlmirror.demo.traffic import infer_request
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.protos import feedback_pb2, inference_pb2, inference_pb2_grpc
from mlmirror.runtime.proxy import Proxy

from loadtest.envoy import running_envoy
from loadtest.ports import free_port

ECHO = "/test.Echo/"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Received:
    method: str
    requests: list[bytes]
    metadata: dict[str, str | bytes]
    metadata_items: tuple[tuple[str, str | bytes], ...]
    time_remaining: float | None


@dataclass
class EchoServer:
    name: str
    server: grpc.aio.Server | None = None
    port: int = 0
    fail_with: grpc.StatusCode | None = None
    sleep: float = 0.0
    received: list[Received] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> EchoServer:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_EchoHandler(self),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    async def __aenter__(self) -> EchoServer:
        return self if self.server is not None else await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _EchoHandler(grpc.GenericRpcHandler):
    def __init__(self, owner: EchoServer) -> None:
        self.owner = owner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method == ECHO + "Unary" or (method.startswith("/inference.") and method.endswith("ModelInfer")):
            return grpc.unary_unary_rpc_method_handler(self._wrap(method, self._unary))
        if method == ECHO + "ServerStream":
            return grpc.unary_stream_rpc_method_handler(self._wrap(method, self._server_stream))
        if method == ECHO + "ClientStream":
            return grpc.stream_unary_rpc_method_handler(self._wrap(method, self._client_stream))
        if method == ECHO + "Bidi":
            return grpc.stream_stream_rpc_method_handler(self._wrap(method, self._bidi))
        return None

    def _wrap(self, method: str, body: Callable):
        owner = self.owner

        async def handle(request, context: grpc.aio.ServicerContext):
            items = tuple((m.key, m.value) for m in context.invocation_metadata())
            md = dict(items)
            record = Received(method, [], md, items, context.time_remaining())
            owner.received.append(record)
            sleep = float(md.get("x-test-sleep", owner.sleep))
            if sleep:
                await asyncio.sleep(sleep)
            if "x-test-initial" in md:
                await context.send_initial_metadata((("x-initial", md["x-test-initial"]),))
            context.set_trailing_metadata((("x-trailer", owner.name), ("x-trailer-bin", b"\x00\xff")))
            code = owner.fail_with or (grpc.StatusCode[md["x-test-code"]] if "x-test-code" in md else None)
            return await body(request, context, record, code, md)

        return handle

    async def _unary(self, request, context, record, code, md):
        record.requests.append(request)
        if code is not None:
            await context.abort(code, f"echo failure from {self.owner.name}")
        return self.owner.name.encode() + b":" + request

    async def _server_stream(self, request, context, record, code, md):
        record.requests.append(request)
        if code is not None:
            await context.abort(code, f"echo failure from {self.owner.name}")
        for i in range(int(md.get("x-test-messages", 3))):
            await context.write(request + b"#" + str(i).encode())

    async def _client_stream(self, requests, context, record, code, md):
        async for message in requests:
            record.requests.append(message)
        if code is not None:
            await context.abort(code, f"echo failure from {self.owner.name}")
        return b"|".join(record.requests)

    async def _bidi(self, requests, context, record, code, md):
        if code is not None:  # read the stream to its end first: a status sent while the client still writes
            async for message in requests:  # can reach a grpc.aio client as INTERNAL (docs/RELIABILITY.md)
                record.requests.append(message)
            await context.abort(code, f"echo failure from {self.owner.name}")
        async for message in requests:
            record.requests.append(message)
            await context.write(b"re:" + message)


class FunctionModel(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe V2 server whose ModelInfer answer is ``outputs(x)`` for the [n, k] FP32 input ``x``: a list of
    (name, datatype, array) sent as raw output contents. ``outputs`` may be swapped while it serves."""

    def __init__(self, outputs: Callable[[np.ndarray], list[tuple[str, str, np.ndarray]]]) -> None:
        self.outputs = outputs
        self.calls = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC method name
        self.calls += 1
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(tensor.shape))
        response = inference_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name, datatype, values in self.outputs(x):
            response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
            response.raw_output_contents.append(np.ascontiguousarray(values).tobytes())
        return response

    async def __aenter__(self) -> FunctionModel:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        await self.server.stop(None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_echo(name: str, port: int = 0) -> EchoServer:
    return await EchoServer(name).start(port)


@contextlib.asynccontextmanager
async def model_server(role: str, port: int = 0) -> AsyncIterator[int]:
    """A demo KServe V2 model server (``production``, ``candidate`` or ``baseline``); yields its port."""
    server, bound = await serve_model(MODELS[role], f"127.0.0.1:{port}")
    try:
        yield bound
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def envoy_running(config: dict, folder: Path) -> AsyncIterator[subprocess.Popen]:
    """The real Envoy running ``config`` (see loadtest/envoy.py), started and stopped in a thread so that
    in-process servers keep serving meanwhile."""
    with contextlib.ExitStack() as stack:
        process = await asyncio.to_thread(stack.enter_context, running_envoy(config, folder))
        try:
            yield process
        finally:
            await asyncio.to_thread(stack.close)


@contextlib.asynccontextmanager
async def running_proxy(config_yaml: str, **kwargs) -> AsyncIterator[Proxy]:
    """A started in-process proxy for ``config_yaml`` (listen/admin default to ephemeral loopback ports)."""
    config_yaml = textwrap.dedent(config_yaml)
    if "listen:" not in config_yaml:
        config_yaml = "listen: 127.0.0.1:0\n" + config_yaml
    if "admin:" not in config_yaml:
        config_yaml = "admin: 127.0.0.1:0\n" + config_yaml
    proxy = Proxy(parse_config(config_yaml, "<test config>"), **kwargs)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop(grace=0)


def config_file(folder: Path, body: str) -> tuple[Path, int, int]:
    """``folder``/mlmirror.yaml: a listen and an admin address on free loopback ports, then ``body``; (the path, the
    listen port, the admin port)."""
    listen, admin = free_port(), free_port()
    path = folder / "mlmirror.yaml"
    path.write_text(f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\n{body.lstrip()}")
    return path, listen, admin


@contextlib.asynccontextmanager
async def guarded_proxy(folder: Path, token: str) -> AsyncIterator[str]:
    """A running proxy (one route to an echo server) whose admin endpoint needs the bearer ``token`` (written to a
    file in ``folder``); yields the admin endpoint's base URL."""
    (folder / "token").write_text(f"{token}\n")
    text = f"""
    admin_token_file: {folder / "token"}
    upstreams: {{p: PRIMARY}}
    routes: [{{match: {{}}, primary: p}}]
    """
    async with EchoServer("p") as primary, through_proxy(text.replace("PRIMARY", primary.address)) as (proxy, _):
        yield f"http://127.0.0.1:{proxy.admin_port}"


@contextlib.asynccontextmanager
async def through_proxy(config_yaml: str, **kwargs) -> AsyncIterator[tuple[Proxy, grpc.aio.Channel]]:
    """A running proxy for ``config_yaml`` and a client channel to it."""
    async with (
        running_proxy(config_yaml, **kwargs) as proxy,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{proxy.grpc_port}", options=[("grpc.max_send_message_length", 2**26)]
        ) as channel,
    ):
        yield proxy, channel


async def wait_until(condition: Callable[..., object], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_ready(proxy: Proxy, within: float = 10.0) -> None:
    await wait_until(lambda: proxy.readiness()[0], within, "the proxy to be ready")


def iris_config(port: int, route: str, *, match: str = "{model: iris}") -> str:
    """The YAML of one route ``iris`` (matching ``match``) to the model server on ``port`` (upstream ``production``),
    with the route's other keys in ``route`` (YAML at any indentation) and the mirror's lag shedding off."""
    body = textwrap.indent(textwrap.dedent(route).strip("\n"), " " * 4)
    return (
        f"mirror_shed_lag: off\nupstreams: {{production: 127.0.0.1:{port}}}\n"
        f"routes:\n  - name: iris\n    match: {match}\n    primary: production\n{body}\n"
    )


def promtool_accepts(exposition: str) -> None:
    """Assert that ``promtool check metrics`` finds nothing wrong with a /metrics text (it lists each problem)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian package prometheus) is needed; .ci/run installs it"
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                             check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == checked.stderr.strip() == "", checked.stdout + checked.stderr


def http_get(url: str, method: str = "GET", body: bytes | None = None, token: str | None = None) -> tuple[int, str]:
    """(status, text) of one admin request; a POST sends ``body`` (empty by default); ``token`` goes as
    ``Authorization: Bearer``."""
    request = urllib.request.Request(url, method=method, data=(body or b"") if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def admin_json(proxy: Proxy, path: str = "/status") -> dict:
    status, body = http_get(f"http://127.0.0.1:{proxy.admin_port}{path}")
    assert status == 200, body
    return json.loads(body)


def mlmirror(*args: str, **kwargs) -> subprocess.Popen:
    """Start the ``mlmirror`` command line as a subprocess (stdout and stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlmirror", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **kwargs,
    )


def fp64_call(x: np.ndarray, outputs: Sequence[tuple[str, np.ndarray]] = ()) -> CallRecord:
    """An answered ModelInfer call as the tap hands it to the drift engine: model "m", FP64 input "input" holding
    ``x``, answered by version "1" with the given FP64 outputs."""
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f8").tobytes())
    response = inference_pb2.ModelInferResponse(model_name="m", model_version="1")
    for name, values in outputs:
        response.outputs.add(name=name, datatype="FP64", shape=list(values.shape))
        response.raw_output_contents.append(np.ascontiguousarray(values, dtype="<f8").tobytes())
    return CallRecord(
        route="m", method="/inference.GRPCInferenceService/ModelInfer", request=request.SerializeToString(),
        response=response.SerializeToString(), code=grpc.StatusCode.OK, served_by="p", role="primary",
        request_id="", metadata=(), started=0.0, latency=0.0, upstream_latency=0.0,
    )  # fmt: skip


def feed_calls(engine: DriftEngine, calls: Iterable[CallRecord], batch: int = 500) -> None:
    """Offer ``calls`` to a drift engine, draining every ``batch`` of them and at the end, as its worker would."""
    for call in calls:
        engine.offer(call)
        if len(engine._queue) >= batch:
            engine.drain()
    engine.drain()


def feed_rows(engine: DriftEngine, rows: np.ndarray) -> None:
    """One ``fp64_call`` per row of ``rows``, fed to ``engine``."""
    feed_calls(engine, (fp64_call(rows[i : i + 1]) for i in range(rows.shape[0])))


def make_certificates(folder: Path, subjects: dict[str, str], extensions: dict[str, str] | None = None) -> Path:
    """A test CA (``ca.pem``, ``ca.key``) in ``folder`` and, for each name of ``subjects``, a key and a certificate
    it signed (``NAME.key``, ``NAME.pem``) with that subject and the X.509 extension lines in ``extensions[NAME]``."""
    if shutil.which("openssl") is None:
        raise AssertionError("openssl is needed to make test certificates; .ci/run installs it")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=mlmirror test CA")  # fmt: skip
    for name, subject in subjects.items():
        extension = (extensions or {}).get(name)
        if extension is not None:
            (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject)  # fmt: skip
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            *(["-extfile", f"{name}.ext"] if extension is not None else []),
        )
    return folder


async def exposition_with_every_metric(tmp_path: Path) -> str:
    """The /metrics text of a live proxy with shadows, drift (attribution, sliding, exported bins), ground truth and
    capture on, after traffic, an outcome report over gRPC and a fallback."""
    rng = np.random.default_rng(0)
    async with model_server("production") as production, model_server("candidate") as candidate:
        config = f"""
        mirror_shed_lag: off
        upstreams:
          production: 127.0.0.1:{production}
          candidate: 127.0.0.1:{candidate}
          dead: {{address: 127.0.0.1:1, timeout: 1s}}
        routes:
          - name: iris
            match: {{model: iris}}
            primary: production
            shadows: [{{upstream: candidate}}]
            drift:
              window: 50
              capture: 50
              sliding: 2
              export_bins: ["input[2]"]
              attribution: {{}}
              ground_truth: {{output: probabilities, window: 10}}
            capture: {{path: {tmp_path / "captures"}}}
          - name: broken
            match: {{model: broken}}
            primary: dead
            fallback: [production]
        """
        async with through_proxy(config) as (proxy, channel):
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            ids = [f"r{i}" for i in range(120)]
            await asyncio.gather(*(infer(infer_request(sample_features(rng, 1), request_id=i)) for i in ids))
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # a move along the chain: the fallback's answer is
                await infer(infer_request(sample_features(rng, 1), model="broken"))  # NOT_FOUND for this model name
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            await wait_until(lambda: proxy.status()["routes"][0]["drift"]["latest"] != [], what="a drift window")
            report = channel.unary_unary("/mlmirror.v1.Feedback/ReportOutcome")
            outcomes = [feedback_pb2.Outcome(request_id=i, labels=["1"]) for i in ids[:20]]
            await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes).SerializeToString())
            await wait_until(lambda: proxy.status()["routes"][0]["shadows"][0]["window"]["calls"] == 120)
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
    assert status == 200
    return body


def naive_differences(p: list[float], s: list[float], atol: float, rtol: float) -> tuple:
    """``(matched, (abs_sum, sq_sum, abs_max, elements))`` of two numeric sequences by the comparison's definitions
    (proxy/observing/shadows/compare.py, kernels/agreement.py), one element at a time in Python floats."""
    matched = True
    abs_sum = sq_sum = abs_max = 0.0
    elements = 0
    for pv, sv in zip(p, s, strict=True):
        d = abs(sv - pv)
        matched &= (d <= atol + rtol * abs(pv) and math.isfinite(pv)) or pv == sv or (math.isnan(pv) and math.isnan(sv))
        if math.isfinite(d):
            abs_sum += d
            sq_sum += d * d
            abs_max = max(abs_max, d)
            elements += 1
    return matched, (abs_sum, sq_sum, abs_max, elements)

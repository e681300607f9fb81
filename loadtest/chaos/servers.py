"""The model servers the chaos scenarios break: in-process ones whose faults are set on the object, and demo model
servers in their own processes (``mlmirror model-server``) that can be SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from mlmirror.demo.models import MODELS, ModelServicer
from mlmirror.protos import inference_pb2_grpc

from ..ports import free_port, wait_for_port

__all__ = ["REPO", "FaultyModel", "ModelProcess", "serve_faulty"]

REPO = Path(__file__).resolve().parents[2]


class FaultyModel(ModelServicer):
    """A demo model whose ModelInfer waits ``delay`` seconds (a large one: hung) and then fails with ``fail_with``
    when it is set."""

    def __init__(self, name: str) -> None:
        super().__init__(MODELS[name])
        self.delay = 0.0
        self.fail_with: grpc.StatusCode | None = None

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC method name
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            await context.abort(self.fail_with, "injected fault")
        return await super().ModelInfer(request, context)


@contextlib.asynccontextmanager
async def serve_faulty(name: str) -> AsyncIterator[tuple[FaultyModel, int]]:
    """An in-process ``FaultyModel`` for the demo model ``name`` on a free loopback port: (model, port)."""
    model = FaultyModel(name)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(model, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield model, port
    finally:
        await server.stop(None)


class ModelProcess:
    """``mlmirror model-server --model NAME`` in its own process, on a fixed port so that it can be restarted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        # subprocess.Popen, not the event loop's spawn: CPython starts the child with vfork, so gRPC's fork handlers
        # never run in this process full of gRPC threads (a plain fork here has crashed the child).
        self.process = subprocess.Popen(  # noqa: ASYNC220 - vfork+exec returns at once
            [sys.executable, "-m", "mlmirror", "model-server", "--model", self.name,
             "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        await asyncio.to_thread(wait_for_port, self.port)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to open connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.process.wait)

    async def __aenter__(self) -> ModelProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()

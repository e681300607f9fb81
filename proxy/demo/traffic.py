"""An open-loop traffic generator of KServe V2 ModelInfer calls, with per-window statistics."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from mlmirror.demo.models import sample_features
from mlmirror.protocol.names import MODEL_INFER, SERVED_BY
from mlmirror.protos import inference_pb2

__all__ = ["TrafficStats", "Window", "infer_request", "run_traffic"]


def infer_request(x: np.ndarray, *, model: str = "iris", request_id: str = "") -> bytes:
    """A serialized ModelInferRequest carrying ``x`` ([n, 4] FP32) as raw input contents."""
    request = inference_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request.SerializeToString()


@dataclass
class Window:
    """What happened in one reporting window."""

    calls: int = 0
    codes: Counter = field(default_factory=Counter)
    served_by: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


@dataclass
class TrafficStats:
    """Totals since the start, plus the current window (``take_window`` starts a new one)."""

    total: Window = field(default_factory=Window)
    window: Window = field(default_factory=Window)

    def add(self, code: grpc.StatusCode, served_by: str, seconds: float) -> None:
        for w in (self.total, self.window):
            w.calls += 1
            w.codes[code.name] += 1
            w.served_by[served_by] += 1
            w.latencies.append(seconds)

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window


async def _one_call(stub, request: bytes, call_timeout: float, stats: TrafficStats) -> None:
    started = time.perf_counter()
    call = stub(request, timeout=call_timeout)
    try:
        await call
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    trailing = await call.trailing_metadata()
    served_by = dict(trailing or ()).get(SERVED_BY, "?")
    stats.add(code, served_by, time.perf_counter() - started)


async def run_traffic(
    target: str,
    *,
    rate: float,
    stop: asyncio.Event,
    stats: TrafficStats,
    models: tuple[str, ...] = ("iris",),
    call_timeout: float = 2.0,
    seed: int = 0,
    shifted: asyncio.Event | None = None,
) -> None:
    """Send ModelInfer calls to ``target`` at ``rate`` calls per second (cycling over ``models``) until ``stop``.

    Open loop: calls start on schedule whether or not earlier ones have answered, so a slow upstream shows up as
    latency, not as a lower offered rate. In-flight calls are awaited before returning. Once ``shifted`` is set, the
    flowers' petals are 1 cm longer (drifting inputs).
    """
    rng = np.random.default_rng(seed)
    pool = [sample_features(rng, 1) for _ in range(256)]
    drifted = [sample_features(rng, 1, shift=1.0) for _ in range(256)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        next_at = time.perf_counter()
        for n in itertools.count():
            if stop.is_set():
                break
            source = drifted if shifted is not None and shifted.is_set() else pool
            request = infer_request(source[n % len(source)], model=models[n % len(models)], request_id=f"demo-{n}")
            task = asyncio.ensure_future(_one_call(stub, request, call_timeout, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if tasks:
            await asyncio.gather(*tasks)

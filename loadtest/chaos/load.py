"""Open-loop ModelInfer traffic: calls started at a fixed rate whatever the answers do, and what each one got."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.protocol.names import MODEL_INFER, SERVED_BY

__all__ = ["MODEL_INFER", "Outcome", "codes", "drive", "p99_ms", "requests"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One client call: its status name, when it started (``time.perf_counter``), its latency (seconds) and the
    upstream that answered (trailer)."""

    code: str
    started: float
    latency: float
    served_by: str


def requests(n: int = 64, seed: int = 7) -> list[bytes]:
    """``n`` serialized iris ModelInfer requests of 2 rows each."""
    rng = np.random.default_rng(seed)
    return [infer_request(sample_features(rng, 2), request_id=f"chaos-{seed}-{i}") for i in range(n)]


async def _one(stub, request: bytes, deadline: float) -> Outcome:
    started = time.perf_counter()
    call = stub(request, timeout=deadline)
    try:
        await call
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    latency = time.perf_counter() - started
    try:
        trailers = dict(await call.trailing_metadata() or ())
    except grpc.aio.AioRpcError:
        trailers = {}
    return Outcome(code, started, latency, str(trailers.get(SERVED_BY, "")))


async def drive(channel: grpc.aio.Channel, calls: int, rate: float, deadline: float = 5.0) -> list[Outcome]:
    """Start ``calls`` calls at ``rate`` calls/s (open loop: a slow answer does not delay the next call); return
    their outcomes in start order. ``deadline``: seconds each call may take."""
    stub = channel.unary_unary(MODEL_INFER)
    bodies = requests()
    tasks = []
    start = time.perf_counter()
    for i in range(calls):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(stub, bodies[i % len(bodies)], deadline)))
    return list(await asyncio.gather(*tasks))


def p99_ms(outcomes: list[Outcome]) -> float:
    """99th percentile latency in milliseconds (NaN without calls)."""
    if not outcomes:
        return math.nan
    return float(np.percentile([o.latency for o in outcomes], 99) * 1e3)


def codes(outcomes: list[Outcome]) -> Counter:
    return Counter(o.code for o in outcomes)

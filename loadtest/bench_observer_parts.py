"""Benchmark: the observing process's CPU per watched call, part by part.

    python -m loadtest.bench_observer_parts [--rounds 5] [--calls 4000] [--inflight 32] [--merge 16]

Real KServe V2 calls like bench_observer's (FP32 [8, 4] in; FP32 [8, 3] probabilities and INT64 [8] labels out,
answered by the demo models). In this process, interleaved rounds of:

- a shadow copy (one unary call, as the mirror makes it) to the demo ``candidate`` model server running at
  ``nice -n 19`` in a process of its own (the stand-in for a remote machine), ``--inflight`` copies at a time,
  over each transport: mlmirror's own HTTP/2 client (``h2``, the default) and a grpc.aio channel (``grpc``);
- the same copies over grpc.aio merged ``--merge`` at a time (a shadow's ``batch``: parsed, merged into one
  request, its answer cut back into each call's outputs), per call;
- the comparison of the shadow's answer with production's (``Comparator.compare``, both answers decoded);
- the drift engine's work for one call (``DriftEngine.drain``: decoding, the window's counts; windows of 1000).

Each figure is this process's CPU time (user + system) over the calls, per call; median of the rounds (range).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time

import grpc
import numpy as np
from mlmirror import eventloop, kernels
from mlmirror.config import parse_config
from mlmirror.demo.models import MODELS, ModelServicer, sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.handoff.tap import CallRecord
from mlmirror.metrics import Metrics
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.shadows.batching import mergeable, merged_request, split
from mlmirror.observing.shadows.compare import Comparator, ProductionAnswer
from mlmirror.observing.shadows.h2client import H2Channel, copy_channel
from mlmirror.protocol.names import MODEL_INFER
from mlmirror.protos import inference_pb2
from mlmirror.serving.upstream import UpstreamTarget

from .ports import free_port, wait_for_port
from .processes import python_process

__all__ = ["main"]

CONFIG = """
upstreams: {{production: 127.0.0.1:1, candidate: 127.0.0.1:{port}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    compare: {{classification: argmax, output: probabilities}}
    shadows: [{{upstream: candidate}}]
    drift: {{window: 1000, capture: 1000, bins: 10}}
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _records(calls: int, seed: int) -> list[CallRecord]:
    rng = np.random.default_rng(seed)
    servicer = ModelServicer(MODELS["production"])  # production's own answers, serialized as its server sends them
    out = []
    for i in range(calls):
        x = sample_features(rng, 8)
        request = infer_request(x, request_id=f"r{i}")
        answer = servicer.answer(inference_pb2.ModelInferRequest.FromString(request))
        out.append(CallRecord("iris", MODEL_INFER, request, answer.SerializeToString(), grpc.StatusCode.OK,
                              "production", "primary", f"r{i}", (), time.time(), 0.001, 0.001))  # fmt: skip
    return out


async def _copies(target: UpstreamTarget, requests: list[bytes], inflight: int) -> float:
    """CPU seconds per copy of ``requests`` over grpc.aio (transport grpc), ``inflight`` at a time; every copy must
    be OK."""
    limit = asyncio.Semaphore(inflight)
    stub = target.stub("unary_unary", MODEL_INFER)

    async def one(request: bytes) -> bytes:
        async with limit:
            return await stub(request, timeout=10.0)

    started = _cpu()
    await asyncio.gather(*(one(r) for r in requests))
    return (_cpu() - started) / len(requests)


async def _h2_copies(channel: H2Channel, requests: list[bytes], inflight: int) -> float:
    """CPU seconds per copy of ``requests`` over mlmirror's own HTTP/2 client (transport h2), ``inflight`` at a
    time; every copy must be OK."""
    limit = asyncio.Semaphore(inflight)

    async def one(request: bytes) -> bytes | None:
        async with limit:
            answer, code = await channel.unary(MODEL_INFER, request, (), 10.0)
            assert code is grpc.StatusCode.OK, code
            return answer

    started = _cpu()
    await asyncio.gather(*(one(r) for r in requests))
    return (_cpu() - started) / len(requests)


async def _merged_copies(target: UpstreamTarget, requests: list[bytes], inflight: int, merge: int) -> float:
    """CPU seconds per call of ``requests`` sent ``merge`` to a request, ``inflight`` requests at a time, each
    answer cut back into the calls' outputs; every request must be OK and cut into its calls."""
    limit = asyncio.Semaphore(inflight)
    stub = target.stub("unary_unary", MODEL_INFER)

    async def one(chunk: list[bytes]) -> int:
        async with limit:
            copies = [mergeable(r, ()) for r in chunk]
            merging = [c for c in copies if c is not None]
            answer = await stub(merged_request(merging), timeout=10.0)
            return len(split(answer, [c.rows for c in merging]))

    started = _cpu()
    cut = await asyncio.gather(*(one(requests[i : i + merge]) for i in range(0, len(requests), merge)))
    assert sum(cut) == len(requests)
    return (_cpu() - started) / len(requests)


async def _rounds(args: argparse.Namespace, port: int) -> tuple[dict[str, list[float]], str]:
    config = parse_config(CONFIG.format(port=port))
    route = config.routes[0]
    target = UpstreamTarget(config.upstreams["candidate"], max_message_size=config.max_message_size, metrics=Metrics())
    records = _records(args.calls, 0)
    requests = [r.request for r in records]
    shadow_answers = [await target.stub("unary_unary", MODEL_INFER)(r) for r in requests]
    comparator = Comparator(route.compare)
    assert route.drift is not None
    kernels.warm_up()
    channel = copy_channel("h2", target.spec, target.max_message_size)
    assert channel is not None
    merged = f"shadow copy, transport: grpc, batch: {args.merge}"
    figures: dict[str, list[float]] = {"shadow copy, transport: h2": [], "shadow copy, transport: grpc": [],
                                       merged: [], "comparison": [], "drift engine": []}  # fmt: skip
    await _copies(target, requests[:500], args.inflight)  # warm-up: connections, caches
    await _h2_copies(channel, requests[:500], args.inflight)
    for k in range(args.rounds):
        figures["shadow copy, transport: h2"].append(await _h2_copies(channel, requests, args.inflight))
        figures["shadow copy, transport: grpc"].append(await _copies(target, requests, args.inflight))
        figures[merged].append(await _merged_copies(target, requests, args.inflight, args.merge))
        started = _cpu()
        for record, answer in zip(records, shadow_answers, strict=True):
            comparator.compare(ProductionAnswer(record.method, record.response or b""), answer)
        figures["comparison"].append((_cpu() - started) / len(records))
        engine = DriftEngine("iris", route.drift)
        for record in records[:1000]:  # the reference
            engine.offer(record)
        engine.drain()
        for record in records:
            engine.offer(record)
        started = _cpu()
        engine.drain()
        figures["drift engine"].append((_cpu() - started) / len(records))
        print(f"round {k + 1}/{args.rounds} done", file=sys.stderr)
    channel.close()
    await target.channel.close()
    return figures, eventloop.loop_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_observer_parts", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4000, help="calls per round (default 4000)")
    parser.add_argument("--inflight", type=int, default=32, help="shadow copies at a time (default 32)")
    parser.add_argument("--merge", type=int, default=16, help="copies per merged request (default 16)")
    args = parser.parse_args(argv)
    port = free_port()
    with python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{port}", "--model", "candidate",
                        nice=19):  # fmt: skip
        wait_for_port(port)
        figures, loop = eventloop.run(_rounds(args, port))  # uvloop, as the observing process runs
    command = "python -m loadtest.bench_observer_parts " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}`\n")
    print(f"{args.calls} calls per round, {args.rounds} interleaved rounds, on {loop}; copies {args.inflight} at a "
          "time to the demo candidate model at nice 19; CPU of this process per call, median (range).\n")  # fmt: skip
    print("| part of a watched call | CPU per call (µs) |\n|---|---:|")
    for part, values in figures.items():
        micro = [v * 1e6 for v in values]
        print(f"| {part} | {statistics.median(micro):.0f} ({min(micro):.0f}-{max(micro):.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

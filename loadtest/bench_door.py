"""Micro-benchmark: what handing one answered call to the hub costs a worker (the serving side of the door).

    python -m loadtest.bench_door [--calls 100000] [--per-turn 16] [--repeat 5]

A worker's event loop offers ``--per-turn`` records per loop iteration to a ``HandoffSender`` connected over a
real Unix socket to a separate process that reads and discards (so the hub's own work is not on this side's
clock). The cost per handed-off call is this process's CPU time (user + system) for the offering turns minus that
of the same number of empty turns, divided by the calls. Records are what a worker hands over for a KServe V2
ModelInfer call: FP32 [8, 4] request, FP32 [8, 3] + INT64 [8] response, the metadata the client sent plus the
request id.

Rows: ``before`` is the previous format (per-call tuples, ``marshal``, kept here only to compare);
``after`` the compact batch frames (proxy/handoff/frames.py), handing over every call; ``after, sampled 10%``
offers every call to a route door whose consumers sample 10% (the cost per *offered* call, most never cross).
Also printed: the handler's own per-call part for a watched route (request id and the record, built whatever the
door does), and the hub's cost to decode a call (for both formats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import marshal
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import grpc
import numpy as np
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.eventloop import run as run_loop
from mlmirror.handoff.frames import decode_batch, encode_batch
from mlmirror.handoff.tap import CallRecord
from mlmirror.handoff.transport import HandoffSender, RouteDoor
from mlmirror.protos import inference_pb2
from mlmirror.serving.sampling import RequestIds
from prometheus_client import CollectorRegistry, Counter

from .processes import python_process

__all__ = ["main"]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_Metadatum = namedtuple("_Metadatum", ["key", "value"])  # what grpc.aio's invocation_metadata() holds
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _call() -> tuple[bytes, bytes, tuple]:
    """(request, response, client metadata) of one KServe V2 ModelInfer call."""
    x = sample_features(np.random.default_rng(0), 8)
    response = inference_pb2.ModelInferResponse(model_name="iris", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[8, 3])
    response.outputs.add(name="label", datatype="INT64", shape=[8])
    response.raw_output_contents.extend([np.full((8, 3), 0.3, "<f4").tobytes(), np.zeros(8, "<i8").tobytes()])
    metadata = (_Metadatum("x-tenant", "acme"), _Metadatum("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"))
    return infer_request(x), response.SerializeToString(), metadata


def _records(count: int) -> list[CallRecord]:
    request, response, client = _call()
    ids = RequestIds()
    records = []
    for _ in range(count):
        request_id, metadata = ids.identify(MODEL_INFER, request, client)
        records.append(CallRecord(route="iris", method=MODEL_INFER, request=request, response=response,
                                  code=grpc.StatusCode.OK, served_by="production", role="primary",
                                  request_id=request_id, metadata=metadata, started=time.time(), latency=0.0012,
                                  upstream_latency=0.0009))  # fmt: skip
    return records


# --- the previous format, to compare against ----------------------------------------------------------------------


def _tuple_of(record: CallRecord) -> tuple:
    metadata = tuple((str(key), value if isinstance(value, bytes) else str(value)) for key, value in record.metadata)
    return (
        record.route, record.method, bytes(record.request), None if record.response is None else bytes(record.response),
        record.code.value[0], record.served_by, record.role, record.request_id, metadata, record.started,
        record.latency, record.upstream_latency,
    )  # fmt: skip


def _record_of(fields: tuple) -> CallRecord:
    route, method, request, response, code, served_by, role, request_id, metadata, started, latency, upstream = fields
    return CallRecord(route=route, method=method, request=request, response=response, code=_CODES[code],
                      served_by=served_by, role=role, request_id=request_id, metadata=metadata, started=started,
                      latency=latency, upstream_latency=upstream)  # fmt: skip


class _MarshalSender(HandoffSender):
    """The sender as it was: a tuple per call at offer, ``marshal`` per batch."""

    _scheduled = False

    def offer(self, record: CallRecord) -> None:
        self._batch.append(_tuple_of(record))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if batch and self._writer is not None:
            payload = marshal.dumps(batch)
            self._writer.write(len(payload).to_bytes(4, "big") + payload)
            self.sent += len(batch)


# --- the measurement ------------------------------------------------------------------------------------------------


def drain(path: str) -> None:
    """The reading end: accept one connection at a time on ``path`` and discard what arrives."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        while True:
            connection, _ = server.accept()
            with connection:
                while connection.recv(1 << 20):
                    pass


async def _turns(offer, records: list[CallRecord], per_turn: int) -> float:
    """CPU seconds for offering ``records``, ``per_turn`` per loop iteration (``offer`` None: empty turns)."""
    started = time.process_time()
    for at in range(0, len(records), per_turn):
        if offer is not None:
            for record in records[at : at + per_turn]:
                offer(record)
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the last flush
    return time.process_time() - started


async def _door_us(path: str, kind: str, records: list[CallRecord], per_turn: int) -> float:
    dropped = Counter("dropped", "bench", ["reason"], registry=CollectorRegistry())
    sender = (_MarshalSender if kind == "before" else HandoffSender)(path, dropped)
    await sender.connect()
    try:
        offer = RouteDoor(sender, 10.0).offer if kind == "after, sampled 10%" else sender.offer
        await _turns(offer, records[: len(records) // 10], per_turn)  # warm up
        empty = await _turns(None, records, per_turn)
        offering = await _turns(offer, records, per_turn)
        sender.flush()  # what the last ``linger`` holds
        if kind != "after, sampled 10%" and sender.sent < len(records):
            raise RuntimeError(f"{kind}: only {sender.sent} of {len(records)} calls handed over")
        return (offering - empty) / len(records) * 1e6
    finally:
        await sender.close()


def _decode_us(kind: str, records: list[CallRecord], per_turn: int) -> float:
    if kind == "before":
        frames = [marshal.dumps([_tuple_of(r) for r in records[at : at + per_turn]])
                  for at in range(0, len(records), per_turn)]  # fmt: skip
        started = time.process_time()
        for frame in frames:
            for fields in marshal.loads(frame):
                _record_of(fields)
    else:
        frames = [encode_batch(records[at : at + per_turn])[0] for at in range(0, len(records), per_turn)]
        started = time.process_time()
        for frame in frames:
            decode_batch(memoryview(frame)[5:])
    return (time.process_time() - started) / len(records) * 1e6


def _handler_us(count: int) -> float:
    """The handler's own part for a watched call: the request id, and the record."""
    started = time.process_time()
    _records(count)
    return (time.process_time() - started) / count * 1e6


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def run(args: argparse.Namespace) -> str:
    records = _records(args.calls)
    kinds = ("before", "after", "after, sampled 10%")
    door: dict[str, list[float]] = {kind: [] for kind in kinds}
    decode: dict[str, list[float]] = {kind: [] for kind in kinds[:2]}
    handler: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "door.sock")
        with python_process("-m", "loadtest.bench_door", "--drain", path):
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise RuntimeError("the reading process did not start")
                time.sleep(0.05)
            for _ in range(args.repeat):
                for kind in kinds:
                    door[kind].append(run_loop(_door_us(path, kind, records, args.per_turn)))
                for kind in decode:
                    decode[kind].append(_decode_us(kind, records, args.per_turn))
                handler.append(_handler_us(min(args.calls, 20_000)))
    size = len(encode_batch(records[:1])[0])
    lines = [
        f"`python -m loadtest.bench_door --calls {args.calls} --per-turn {args.per_turn} --repeat {args.repeat}`",
        "",
        f"KServe V2 ModelInfer records (FP32 [8,4] request, {size}-byte frame per call); {args.per_turn} calls per "
        f"event-loop iteration; uvloop; a separate process reads the socket. Median over {args.repeat} runs "
        "(range). CPU µs per call: this process's user + system time, offering turns minus empty turns.",
        "",
        "| door | serving-side CPU per call (µs) | hub-side decode per call (µs) |",
        "|---|---:|---:|",
    ]
    for kind in kinds:
        lines.append(f"| {kind} | {_fmt(door[kind])} | {_fmt(decode[kind]) if kind in decode else '-'} |")
    lines += ["", f"The handler's own part of a watched call (request id, record): {_fmt(handler)} µs per call."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_door", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls handed over per run (default 100000)")
    parser.add_argument("--per-turn", type=int, default=16, help="calls offered per event-loop iteration")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each row (default 5)")
    parser.add_argument("--drain", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drain:
        with contextlib.suppress(KeyboardInterrupt):
            drain(args.drain)
        return 0
    if args.calls < 10 or args.per_turn < 1 or args.repeat < 1:
        parser.error("--calls must be >= 10, --per-turn and --repeat >= 1")
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

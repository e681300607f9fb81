"""Sending captured calls to the candidate: the request bytes as captured, at a bounded concurrency and rate.

Each call goes to ``target`` by its captured method with a byte-level stub (no serializers: the candidate gets the
very bytes production got, redacted inputs zeroed as the capture wrote them), with metadata
``x-mlmirror-request-id`` (the captured id) and ``x-mlmirror-replay: 1``. With ``model`` set, the KServe model name
(field 1 of ModelInfer, ModelReady and ModelMetadata requests) is replaced by appending that field once more: a
protobuf reader takes the last occurrence, and every other byte stays as captured.

At most ``concurrency`` calls are in flight; with ``rate`` > 0, call ``i`` starts no earlier than ``i / rate``
seconds after the first. Before sending, the channel must connect within ``connect_timeout`` seconds, else
``ReplayError`` (the replay could not run). Every call's answer is kept: its status code, response bytes, and its
latency (seconds, from sending to the answer, measured here).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from mlmirror.config import TlsClient
from mlmirror.errors import ReplayError
from mlmirror.protocol.wire import encode_string_field
from mlmirror.replay.captured import CapturedCall
from mlmirror.serving.sampling import REQUEST_ID

__all__ = ["REPLAY", "Answer", "SendOptions", "send_calls"]

#: Metadata key marking replayed calls (value ``1``), so that a candidate's logs can tell them apart.
REPLAY = "x-mlmirror-replay"
_MODEL_NAMED = frozenset(
    f"/inference.GRPCInferenceService/{name}" for name in ("ModelInfer", "ModelReady", "ModelMetadata")
)
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                    ("grpc.enable_retries", 0)]  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class SendOptions:
    """How calls are sent: ``rate`` in calls per second (0: as fast as ``concurrency`` allows); timeouts in
    seconds; ``tls`` None for plaintext."""

    concurrency: int = 8
    rate: float = 0.0
    timeout: float = 10.0
    connect_timeout: float = 10.0
    tls: TlsClient | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The candidate's answer to one call; ``response`` None unless ``code`` is OK; ``latency`` in seconds."""

    code: grpc.StatusCode
    response: bytes | None
    latency: float
    details: str = ""


async def send_calls(
    calls: Sequence[CapturedCall],
    target: str,
    options: SendOptions,
    progress: Callable[[int, int], None] | None = None,
) -> list[Answer]:
    """Send every call to ``target``; the answers in the order of ``calls``. Raises ``ReplayError`` when the
    target cannot be reached or a TLS file cannot be read."""
    answers: list[Answer | None] = [None] * len(calls)
    async with _channel(target, options.tls) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), options.connect_timeout)
        except TimeoutError:
            raise ReplayError(
                f"target {target} unreachable: no connection within {options.connect_timeout:g}s"
            ) from None
        stubs: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        indices = itertools.count()
        done = 0
        started = time.monotonic()

        async def worker() -> None:
            nonlocal done
            for i in indices:
                if i >= len(calls):
                    return
                if options.rate > 0:
                    delay = started + i / options.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                call = calls[i]
                stub = stubs.get(call.method)
                if stub is None:
                    stub = stubs[call.method] = channel.unary_unary(call.method)
                answers[i] = await _send(stub, call, options)
                done += 1
                if progress is not None:
                    progress(done, len(calls))

        await asyncio.gather(*(worker() for _ in range(max(1, min(options.concurrency, len(calls))))))
    return [answer for answer in answers if answer is not None]


async def _send(stub: grpc.aio.UnaryUnaryMultiCallable, call: CapturedCall, options: SendOptions) -> Answer:
    request = call.request
    if options.model is not None and call.method in _MODEL_NAMED:
        request = request + encode_string_field(1, options.model)
    metadata: list[tuple[str, str]] = [(REPLAY, "1")]
    if call.request_id:
        metadata.append((REQUEST_ID, call.request_id))
    sent = time.perf_counter()
    try:
        response = await stub(request, timeout=options.timeout, metadata=tuple(metadata))
    except grpc.aio.AioRpcError as error:
        return Answer(error.code(), None, time.perf_counter() - sent, error.details() or "")
    return Answer(grpc.StatusCode.OK, response, time.perf_counter() - sent)


def _channel(target: str, tls: TlsClient | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read the TLS file: {exc.strerror or exc}") from None

    credentials = grpc.ssl_channel_credentials(read(tls.ca), read(tls.key), read(tls.cert))
    options = [*_CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else [])]
    return grpc.aio.secure_channel(target, credentials, options=options)

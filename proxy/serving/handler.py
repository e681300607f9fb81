"""The generic gRPC handler: relays any method as raw bytes along its route's fallback chain.

One entry function per call type. Requests and responses are never decoded here (the router reads one field of a
ModelInfer request, nothing more). Metadata is passed through minus hop-by-hop headers; the client's remaining
deadline caps every attempt; the upstream's initial metadata, status, details and trailing metadata reach the
client, with ``x-mlmirror-served-by: <upstream>`` added to the trailers.

Fallback happens only while nothing has been relayed to the client: for unary responses, until the answer; for
streamed responses, until the first message; for streamed requests, while the messages read so far fit in the
replay budget (``stream_replay_limit``).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, Protocol

import grpc
from mlmirror.handoff.tap import CallRecord
from mlmirror.protocol.names import HOP_BY_HOP_METADATA, MODEL_INFER, REQUEST_ID, SERVED_BY, STATIC_DEFAULT
from mlmirror.serving.chain import FallbackChain, cancelled_attempt
from mlmirror.serving.replay import RequestReplay
from mlmirror.serving.table import RouteRuntime, RouteTable
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["ProxyHandler", "forwarded_metadata"]

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_Metadata = tuple[tuple[str, str | bytes], ...]


def forwarded_metadata(metadata: Any) -> _Metadata:
    """The client's metadata to send upstream: every entry but the hop-by-hop ones, in order, values untouched."""
    return tuple(item for item in metadata if item[0] not in HOP_BY_HOP_METADATA)


class TableSource(Protocol):
    """Whatever holds the current route table (the proxy); read once per call."""

    table: RouteTable


class ProxyHandler(grpc.GenericRpcHandler):
    """Serves every method not registered on the server (health and reflection are) by relaying it."""

    def __init__(self, source: TableSource) -> None:
        self._source = source
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._build(method)
        return handler

    def invalidate(self) -> None:
        """Forget cached handlers (call types may have changed with a reload)."""
        self._handlers = {}

    def _build(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        call_type = self._source.table.call_type(method)
        handler: grpc.RpcMethodHandler[bytes, bytes]
        if call_type == "unary_unary":
            handler = grpc.unary_unary_rpc_method_handler(functools.partial(self._unary_unary, method))
        elif call_type == "unary_stream":
            handler = grpc.unary_stream_rpc_method_handler(functools.partial(self._unary_stream, method))
        elif call_type == "stream_unary":
            handler = grpc.stream_unary_rpc_method_handler(functools.partial(self._stream_unary, method))
        else:
            handler = grpc.stream_stream_rpc_method_handler(functools.partial(self._stream_stream, method))
        if len(self._handlers) >= 4096:  # method names come from clients: bound the cache
            self._handlers = {}
        self._handlers[method] = handler
        return handler

    # --- the four call types ----------------------------------------------------------------------------------

    async def _unary_unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
        entered = time.perf_counter()
        table = self._source.table
        table.inflight += 1
        try:
            route, model = table.route_for(method, request)
            if route is None:
                return await _unrouted(table, method, model, context)
            return await _unary_response(route, method, "unary_unary", request, None, context, entered)
        finally:
            table.release()

    async def _stream_unary(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes | None:
        entered = time.perf_counter()
        table = self._source.table
        table.inflight += 1
        replay = RequestReplay(requests, table.config.stream_replay_limit)
        try:
            route, _ = table.route_for(method, None)
            if route is None:
                return await _unrouted(table, method, None, context)
            return await _unary_response(route, method, "stream_unary", b"", replay, context, entered)
        finally:
            replay.close()
            table.release()

    async def _unary_stream(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> None:
        table = self._source.table
        table.inflight += 1
        try:
            route, model = table.route_for(method, request)
            if route is None:
                await _unrouted(table, method, model, context)
                return
            await _stream_response(route, method, "unary_stream", lambda: request, lambda: True, context)
        finally:
            table.release()

    async def _stream_stream(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        table = self._source.table
        table.inflight += 1
        replay = RequestReplay(requests, table.config.stream_replay_limit)
        try:
            route, _ = table.route_for(method, None)
            if route is None:
                await _unrouted(table, method, None, context)
                return
            await _stream_response(route, method, "stream_stream", replay.messages, lambda: replay.replayable, context)
        finally:
            replay.close()
            table.release()


# --- shared relays ----------------------------------------------------------------------------------------------


async def _unary_response(
    route: RouteRuntime,
    method: str,
    call_type: str,
    request: bytes,
    replay: RequestReplay | None,
    context: grpc.aio.ServicerContext,
    entered: float,
) -> bytes | None:
    """Relay a call with a single response message (unary-unary, or stream-unary when ``replay`` is given).

    Unary-unary calls of an observed route (shadows, drift) get a request id, passed upstream and returned in the
    trailers, and are handed to the route's tap once answered, errors included."""
    metadata = forwarded_metadata(context.invocation_metadata())
    tap = route.tap if replay is None and route.tap else None
    trailers: _Metadata = ()
    request_id = ""
    if tap is not None:
        request_id, metadata = route.ids.identify(method, request, metadata)
        trailers = ((REQUEST_ID, request_id),)
    chain = FallbackChain(route, context.time_remaining())
    last_error: grpc.aio.AioRpcError | None = None
    last_target = ""
    while (step := chain.next_target()) is not None:
        target, role, timeout = step
        stub = target.stub(call_type, method)
        call = stub(request if replay is None else replay.messages(), metadata=metadata, timeout=timeout)
        started = time.perf_counter()
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            retry = replay is None or replay.replayable
            seconds = time.perf_counter() - started
            if chain.failed(target, role, error.code(), seconds, retry):
                last_error, last_target = error, target.name
                continue
            if tap is not None:
                tap.offer(
                    _record(route, method, request, None, error.code(), target.name, role, request_id, metadata,
                            entered, seconds)
                )  # fmt: skip
            return await _relay_error(
                route, context, target.name, error.code(), error.details(), (*error.trailing_metadata(), *trailers)
            )
        except asyncio.CancelledError:
            cancelled_attempt(chain, call, target, role, started)
            raise
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(initial)
        seconds = await _succeeded(route, context, call, target, role, started, trailers)
        if tap is not None:
            tap.offer(_record(route, method, request, response, _OK, target.name, role, request_id, metadata, entered,
                              seconds))  # fmt: skip
        return response
    if route.static is not None and method == MODEL_INFER and not chain.out_of_time:
        chain.finish(STATIC_DEFAULT)
        started = time.perf_counter()
        response = route.static.render(request)
        seconds = time.perf_counter() - started
        route.metrics.attempt(STATIC_DEFAULT, "fallback", "OK", seconds)
        context.set_trailing_metadata(((SERVED_BY, STATIC_DEFAULT), *trailers))
        route.metrics.answered("OK")
        if tap is not None:
            tap.offer(_record(route, method, request, response, _OK, STATIC_DEFAULT, "fallback", request_id, metadata,
                              entered, seconds))  # fmt: skip
        return response
    if tap is not None:
        code = last_error.code() if last_error is not None else grpc.StatusCode.UNAVAILABLE
        tap.offer(_record(route, method, request, None, code, last_target or "none", "primary", request_id, metadata,
                          entered, math.nan))  # fmt: skip
    return await _exhausted(route, chain, context, last_error, last_target, trailers)


async def _stream_response(
    route: RouteRuntime,
    method: str,
    call_type: str,
    request: Callable[[], Any],
    replayable: Callable[[], bool],
    context: grpc.aio.ServicerContext,
) -> None:
    """Relay a call with a streamed response (unary-stream, stream-stream). ``request()`` gives the request bytes
    or a fresh iterator over the request stream for each attempt."""
    metadata = forwarded_metadata(context.invocation_metadata())
    chain = FallbackChain(route, context.time_remaining())
    last_error: grpc.aio.AioRpcError | None = None
    last_target = ""
    while (step := chain.next_target()) is not None:
        target, role, timeout = step
        call = target.stub(call_type, method)(request(), metadata=metadata, timeout=timeout)
        started = time.perf_counter()
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as error:
            if chain.failed(target, role, error.code(), time.perf_counter() - started, replayable()):
                last_error, last_target = error, target.name
                continue
            await _relay_error(route, context, target.name, error.code(), error.details(), error.trailing_metadata())
            return
        except asyncio.CancelledError:
            cancelled_attempt(chain, call, target, role, started)
            raise
        # Committed to this upstream: from here on its stream and its status are the client's.
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(initial)
            while message is not grpc.aio.EOF:
                await context.write(message)
                message = await call.read()
        except grpc.aio.AioRpcError as error:
            chain.failed(target, role, error.code(), time.perf_counter() - started, retry=False)
            await _relay_error(route, context, target.name, error.code(), error.details(), error.trailing_metadata())
            return
        except asyncio.CancelledError:
            cancelled_attempt(chain, call, target, role, started)
            raise
        await _succeeded(route, context, call, target, role, started)
        return
    await _exhausted(route, chain, context, last_error, last_target)


async def _exhausted(
    route: RouteRuntime,
    chain: FallbackChain,
    context: grpc.aio.ServicerContext,
    last_error: grpc.aio.AioRpcError | None,
    last_target: str,
    trailers: _Metadata = (),
) -> NoReturn:
    """No upstream answered: relay the last upstream error, or say why none was tried."""
    chain.finish("none")
    if last_error is not None:
        code, details, trailing = last_error.code(), last_error.details(), last_error.trailing_metadata()
    elif chain.out_of_time:
        code, details, trailing = grpc.StatusCode.DEADLINE_EXCEEDED, "mlmirror: deadline exceeded", ()
    else:
        code, trailing = grpc.StatusCode.UNAVAILABLE, ()
        details = f"mlmirror: no upstream of route {route.name} available (circuit open: {', '.join(chain.skipped)})"
    await _relay_error(route, context, last_target or "none", code, details, (*(trailing or ()), *trailers))


async def _relay_error(
    route: RouteRuntime,
    context: grpc.aio.ServicerContext,
    served_by: str,
    code: grpc.StatusCode,
    details: str | None,
    trailing: Any,
) -> NoReturn:
    """End the client's call with ``code``; never returns (``abort`` raises)."""
    route.metrics.answered(code.name)
    await context.abort(code, details or "", (*(trailing or ()), (SERVED_BY, served_by)))


async def _succeeded(
    route: RouteRuntime,
    context: grpc.aio.ServicerContext,
    call: Any,
    target: UpstreamTarget,
    role: str,
    started: float,
    trailers: _Metadata = (),
) -> float:
    """The upstream ended the call OK: record it, and pass its trailers on with ``x-mlmirror-served-by`` (and
    ``trailers``). Returns the attempt's duration in seconds."""
    seconds = time.perf_counter() - started
    target.breaker.record_success()
    route.metrics.attempt(target.name, role, "OK", seconds)
    context.set_trailing_metadata((*(await call.trailing_metadata()), (SERVED_BY, target.name), *trailers))
    route.metrics.answered("OK")
    return seconds


async def _unrouted(table: RouteTable, method: str, model: str | None, context: grpc.aio.ServicerContext) -> NoReturn:
    table.metrics.unrouted_calls.inc()
    what = f"method {method}" + (f" and model {model!r}" if model else "")
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"mlmirror: no route for {what}")


def _record(
    route: RouteRuntime,
    method: str,
    request: bytes,
    response: bytes | None,
    code: grpc.StatusCode,
    served_by: str,
    role: str,
    request_id: str,
    metadata: _Metadata,
    entered: float,
    upstream_seconds: float,
) -> CallRecord:
    latency = time.perf_counter() - entered
    return CallRecord(
        route=route.name,
        method=method,
        request=request,
        response=response,
        code=code,
        served_by=served_by,
        role=role,
        request_id=request_id,
        metadata=metadata,
        started=time.time() - latency,
        latency=latency,
        upstream_latency=upstream_seconds,
    )

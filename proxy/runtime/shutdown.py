"""How a proxy stops serving without losing an accepted call, in the order load balancers expect.

1. Not ready at once (``/readyz`` 503, grpc health NOT_SERVING: the caller's part), and still serving for
   ``shutdown_delay`` seconds, so that load balancers (Envoy's health checks, Kubernetes endpoints) stop sending.
2. Stop accepting: the ``Door`` in front of the relay closes, and each new call is answered UNAVAILABLE at once,
   never relayed, so that a client or balancer may retry it elsewhere.
3. Drain: the gRPC server is stopped with what is left of ``shutdown_grace``; calls in flight finish.

Why the door: grpc's ``server.stop`` ends the calls it has received but not yet handed to a handler with CANCELLED
(grpc/grpc#41785: they wait in the core's queue while the event loop is busy, and shutting down drops that queue;
73 of 305 calls in flight were lost so under load, docs/RELIABILITY.md). Behind a closed door each call is refused
in microseconds, the event loop keeps up with arrivals, and the server is stopped only once no call has knocked for
``QUIET`` seconds (or the grace is up): the core's queue is empty then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

__all__ = ["QUIET", "Door", "serve_out"]

log = logging.getLogger(__name__)

#: seconds without a knock at the closed door before the gRPC server is stopped
QUIET = 0.1

_CLOSED = "mlmirror is shutting down and takes no new calls; retry on another instance"


class Door(grpc.GenericRpcHandler):
    """``inner`` (the relay) while open; once ``close``d, every call is refused with UNAVAILABLE without being read
    or relayed. ``refused`` counts those; ``last_knock`` is when the latest came (monotonic seconds)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self.closed = False
        self.refused = 0
        self.last_knock = 0.0
        #: any call type: it reads nothing
        self._refusal: grpc.RpcMethodHandler = grpc.stream_stream_rpc_method_handler(self._refuse)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if not self.closed:
            return self._inner.service(handler_call_details)
        self.refused += 1
        self.last_knock = time.monotonic()
        return self._refusal

    def close(self) -> None:
        self.closed = True
        self.last_knock = time.monotonic()

    async def _refuse(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, _CLOSED)

    async def quiet(self, still: float, deadline: float) -> bool:
        """Wait until no call has knocked for ``still`` seconds, or until ``deadline`` (monotonic); True if quiet."""
        while True:
            now = time.monotonic()
            if now - self.last_knock >= still:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(still - (now - self.last_knock), deadline - now, 0.05))


async def serve_out(
    server: grpc.aio.Server | None, door: Door, *, delay: float, grace: float, inflight: Callable[[], int]
) -> None:
    """Steps 1 (the waiting part) to 3 above: serve on for ``delay`` seconds, close ``door``, stop ``server``
    once the door is quiet, within ``grace`` seconds. ``inflight()``: calls being served, for the log."""
    if delay > 0 and server is not None:
        log.info("stopping: not ready, still serving for %.1fs (shutdown_delay)", delay)
        await asyncio.sleep(delay)
    log.info("stopping: draining %d in-flight calls (grace %.1fs)", inflight(), grace)
    deadline = time.monotonic() + grace
    door.close()
    if server is not None:
        if grace > 0:
            await door.quiet(QUIET, deadline)
        await server.stop(max(deadline - time.monotonic(), 0.0))
    if door.refused:
        log.info("stopping: %d calls refused (UNAVAILABLE) after the proxy stopped accepting", door.refused)

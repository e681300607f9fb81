"""Fire-and-forget copies of a route's calls to its shadows, and the comparison of their answers with production's.

The handler hands each answered unary call to the route's ``RouteMirror`` (through the tap) before the client's
answer is sent; ``offer`` only appends it to a list and, once per event-loop iteration, schedules ``_dispatch``.
Everything else happens after the client has its answer: sampling, the size and circuit checks, the copy itself,
decoding and comparison.

Each shadow is bounded on its own: at most ``max_inflight`` copies in flight, at most ``queue_size`` waiting, each
capped by ``timeout``. A copy that cannot be sent is dropped and counted by reason:

- ``too_large``: the request exceeds the shadow's ``max_message_size``;
- ``shed``: the event loop runs late (``mirror_shed_lag``), so mirror work goes first;
- ``circuit_open``: the shadow's circuit breaker is open (it keeps failing);
- ``queue_full``: the shadow's in-flight limit and queue are both full;
- ``closed``: still queued when the shadow was removed by a reload or a promotion;
- ``unredactable``: the route redacts inputs (``redact``) and this request cannot be redacted (not ModelInfer, or
  malformed): it is never sent as it is.

On a route with ``redact``, copies carry the request with those inputs zeroed (proxy/observing/redact.py), computed once
per call for all the route's shadows, when the first shadow with room takes it.

Copies in flight at that moment are cancelled and finish as ``CANCELLED``: every sampled copy ends up finished,
dropped, or still pending.

The memory a shadow can hold is therefore at most ``(max_inflight + queue_size) * max_message_size`` of requests
(plus production's answers), whatever the shadow does.

Copies carry the client's metadata without credentials (``authorization``, ``cookie``, ``proxy-authorization``,
``x-api-key``) and the shadow's ``strip_metadata``, unless its ``forward_metadata`` names them
(proxy/observing/shadows/headers.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence

import grpc
from mlmirror.config import Compare, Promotion, Shadow
from mlmirror.handoff.tap import CallRecord
from mlmirror.looplag import LoopLag
from mlmirror.metrics import LATENCY_BUCKETS
from mlmirror.observing.redact import RedactedRequest
from mlmirror.observing.shadows.compare import Comparator, Comparison, ProductionAnswer
from mlmirror.observing.shadows.headers import ShadowHeaders
from mlmirror.observing.shadows.verdict import Outcome, Verdict, Window, WindowSummary, judge
from mlmirror.protocol.kserve import TensorError
from mlmirror.protocol.names import SHADOW
from mlmirror.serving.resilience import CircuitState
from mlmirror.serving.sampling import sampled
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["DROP_REASONS", "RouteMirror", "ShadowMirror", "ShadowStats"]

log = logging.getLogger(__name__)

DROP_REASONS = ("too_large", "shed", "circuit_open", "queue_full", "closed", "unredactable")
_OK = grpc.StatusCode.OK


class ShadowStats:
    """What one shadow did: cumulative counters (exported as Prometheus counters) and the rolling window."""

    __slots__ = ("comparison_errors", "comparisons", "drops", "latency", "results", "window")

    def __init__(self, window: int) -> None:
        #: grpc code name -> copies that ended with it
        self.results: dict[str, int] = {}
        #: reason -> copies not sent
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        #: match | mismatch | error -> compared answers
        self.comparisons: dict[str, int] = {"match": 0, "mismatch": 0, "error": 0}
        #: reason -> comparison errors
        self.comparison_errors: dict[str, int] = {}
        #: copies per latency bucket (the last one +Inf), then the sum of seconds
        self.latency: list[float] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        self.window = Window(window)

    def dropped(self, reason: str) -> None:
        self.drops[reason] += 1

    def finished(self, code: str, seconds: float) -> None:
        self.results[code] = self.results.get(code, 0) + 1
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency[-1] += seconds

    def compared(self, comparison: Comparison) -> None:
        if comparison.error is not None:
            self.comparisons["error"] += 1
            self.comparison_errors[comparison.error] = self.comparison_errors.get(comparison.error, 0) + 1
        else:
            self.comparisons["match" if comparison.matched else "mismatch"] += 1


class ShadowMirror:
    """Mirrors one route's sampled calls to one shadow and compares the answers."""

    def __init__(
        self,
        route: str,
        spec: Shadow,
        target: UpstreamTarget,
        compare: Compare,
        promotion: Promotion,
        lag: LoopLag,
    ) -> None:
        self.route = route
        self.spec = spec
        self.name = spec.name
        self.target = target
        self.compare_spec = compare
        self.promotion = promotion
        self.stats = ShadowStats(promotion.window)
        self._comparator = Comparator(compare)
        self._headers = ShadowHeaders(route, spec)
        self._lag = lag
        self._queue: deque[tuple[CallRecord, bytes, ProductionAnswer | None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._warned = False

    def same_as(self, spec: Shadow, target: UpstreamTarget, compare: Compare, promotion: Promotion) -> bool:
        """Whether a reload may keep this mirror (and its statistics) for the given settings."""
        return (spec, target, compare, promotion) == (self.spec, self.target, self.compare_spec, self.promotion)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def consider(
        self, record: CallRecord, production: ProductionAnswer | None, redacted: RedactedRequest | None = None
    ) -> None:
        """Send a copy of ``record``'s request (``redacted``'s when given) if it is sampled and the shadow has room;
        else count why not."""
        spec = self.spec
        if not sampled(record.request_id, spec.percent) or self._closed:
            return
        if len(record.request) > spec.max_message_size:
            self.stats.dropped("too_large")
        elif self._lag.overloaded:
            self.stats.dropped("shed")
        elif len(self._tasks) < spec.max_inflight or len(self._queue) < spec.queue_size:
            try:
                request = record.request if redacted is None else redacted.value()
            except TensorError:
                self.stats.dropped("unredactable")
                return
            if len(self._tasks) >= spec.max_inflight:
                self._queue.append((record, request, production))
            elif self._admit():
                task = asyncio.get_running_loop().create_task(self._work(record, request, production))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            self.stats.dropped("queue_full")

    def _admit(self) -> bool:
        """Ask the circuit breaker; count a drop when it refuses."""
        if self.target.breaker.allow():
            return True
        self.stats.dropped("circuit_open")
        return False

    async def _work(self, record: CallRecord, request: bytes, production: ProductionAnswer | None) -> None:
        """Mirror ``record`` (sending ``request``), then whatever is queued, until the queue is empty."""
        while True:
            await self._mirror(record, request, production)
            while self._queue:
                record, request, production = self._queue.popleft()
                if self._admit():
                    break
            else:
                return

    async def _mirror(self, record: CallRecord, request: bytes, production: ProductionAnswer | None) -> None:
        started = time.perf_counter()
        try:
            answer, code = await self._copy(record, request)
        except asyncio.CancelledError:  # close(): a reload or promotion removed the shadow, or the proxy stops
            self.target.breaker.record(grpc.StatusCode.CANCELLED)
            self.stats.finished(grpc.StatusCode.CANCELLED.name, time.perf_counter() - started)
            raise
        seconds = time.perf_counter() - started
        if code is _OK:
            self.target.breaker.record_success()
        else:
            self.target.breaker.record(code)
        self.stats.finished(code.name, seconds)
        try:
            self._judge(record, production, answer, seconds)
        except Exception:  # a comparator bug must cost one comparison, never the worker
            self.stats.compared(Comparison(matched=False, agree=0, samples=0, error="internal"))
            if not self._warned:
                self._warned = True
                log.exception(
                    "shadow %s of route %s: comparison failed (further errors only counted)", self.name, self.route
                )

    async def _copy(self, record: CallRecord, request: bytes) -> tuple[bytes | None, grpc.StatusCode]:
        """Send one copy: (the shadow's answer or None, its code)."""
        metadata = (*self._headers(record.metadata), (SHADOW, self.name))
        call = self.target.stub("unary_unary", record.method)(request, metadata=metadata, timeout=self.spec.timeout)
        try:
            return await call, _OK
        except grpc.aio.AioRpcError as error:
            return None, error.code()
        except asyncio.CancelledError:
            call.cancel()
            raise

    def _judge(
        self, record: CallRecord, production: ProductionAnswer | None, answer: bytes | None, seconds: float
    ) -> None:
        comparison = None
        if production is not None and answer is not None:
            comparison = self._comparator.compare(production, answer)
            self.stats.compared(comparison)
        production_ok = production is not None
        self.stats.window.add(
            Outcome(
                shadow_ok=answer is not None,
                production_ok=production_ok,
                agree=comparison.agree if comparison else 0,
                samples=comparison.samples if comparison else 0,
                shadow_latency=seconds,
                production_latency=record.upstream_latency if production_ok else math.nan,
                abs_sum=comparison.abs_sum if comparison else 0.0,
                sq_sum=comparison.sq_sum if comparison else 0.0,
                abs_max=comparison.abs_max if comparison else 0.0,
                elements=comparison.elements if comparison else 0,
                compared=comparison is not None,
            )
        )

    def summary(self) -> WindowSummary:
        return self.stats.window.summary()

    def close(self) -> None:
        """Stop: cancel copies in flight, count queued ones as dropped."""
        self._closed = True
        for _ in self._queue:
            self.stats.dropped("closed")
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()

    @property
    def circuit_open(self) -> bool:
        return self.target.breaker.state is CircuitState.OPEN


class RouteMirror:
    """The tap observer of one route: hands each answered call to every shadow of the route, after the answer.
    ``redact``: input tensors zeroed in every copy."""

    def __init__(
        self, route: str, shadows: Sequence[ShadowMirror], promotion: Promotion, redact: tuple[str, ...] = ()
    ) -> None:
        self.name = f"mirror:{route}"
        self.route = route
        self.shadows = tuple(shadows)
        self.promotion = promotion
        self.redact = redact
        self._pending: list[CallRecord] = []
        self._scheduled = False
        self._limit = sum(s.spec.max_inflight + s.spec.queue_size for s in shadows) + 1024

    def offer(self, record: CallRecord) -> None:
        """Constant time, on the critical path: keep the record until the next event-loop iteration."""
        if len(self._pending) >= self._limit:  # the loop is not iterating: queues are full anyway
            for shadow in self.shadows:
                shadow.stats.dropped("queue_full")
            return
        self._pending.append(record)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        pending, self._pending = self._pending, []
        self._scheduled = False
        for record in pending:
            production = (
                ProductionAnswer(record.method, record.response)
                if record.response is not None and record.role == "primary"
                else None
            )
            redacted = RedactedRequest(record.method, record.request, self.redact) if self.redact else None
            for shadow in self.shadows:
                shadow.consider(record, production, redacted)

    def verdicts(self) -> dict[str, tuple[WindowSummary, Verdict]]:
        """Each shadow's window summary and verdict, judged against the route's control noise."""
        summaries = {shadow.name: shadow.summary() for shadow in self.shadows}
        noise = 0.0
        for shadow in self.shadows:
            control = summaries[shadow.name]
            if shadow.spec.control and control.samples >= self.promotion.min_samples:
                noise = 1.0 - control.agreement
        return {
            shadow.name: (
                summaries[shadow.name],
                judge(summaries[shadow.name], self.promotion, noise, control=shadow.spec.control),
            )
            for shadow in self.shadows
        }

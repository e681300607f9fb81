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

A shadow with ``batch: N`` (N > 1) merges up to N waiting ``ModelInfer`` copies into one request
(proxy/observing/shadows/batching.py): each event-loop pass's calls wait in the queue and go out when the pass
ends, up to N per request, at most ``max_inflight`` requests in flight. Its queue holds up to ``queue_size`` calls
plus N for each free request slot; its memory is at most ``(N * max_inflight + queue_size) * max_message_size``.
Every counter still counts calls: a merged request's code, latency and comparison count once per call it carried.
Now and then a merged call is also sent alone, and merging stops if the answers differ (mergecheck.py).

Copies go over mlmirror's own HTTP/2 client (h2client.py) or the upstream's grpc.aio channel (``transport``).
Copies carry the client's metadata without credentials (``authorization``, ``cookie``, ``proxy-authorization``,
``x-api-key``) and the shadow's ``strip_metadata``, unless its ``forward_metadata`` names them
(proxy/observing/shadows/headers.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import grpc
from mlmirror.config import Compare, Promotion, Shadow
from mlmirror.handoff.tap import CallRecord
from mlmirror.looplag import LoopLag
from mlmirror.observing.redact import RedactedRequest
from mlmirror.observing.shadows.batching import Mergeable, mergeable, merged_request, shared_metadata, split
from mlmirror.observing.shadows.compare import Comparator, Comparison, ProductionAnswer
from mlmirror.observing.shadows.h2client import copy_channel
from mlmirror.observing.shadows.headers import ShadowHeaders
from mlmirror.observing.shadows.mergecheck import UNREACHED, MergeCheck
from mlmirror.observing.shadows.stats import DROP_REASONS, ShadowStats
from mlmirror.observing.shadows.verdict import Outcome, Verdict, WindowSummary, judge
from mlmirror.protocol.kserve import Tensor, TensorError
from mlmirror.protocol.names import MODEL_INFER, SHADOW
from mlmirror.serving.resilience import CircuitState
from mlmirror.serving.sampling import sampled
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["DROP_REASONS", "RouteMirror", "ShadowMirror", "ShadowStats"]

log = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK
Production = ProductionAnswer | None
Copy = tuple[CallRecord, bytes, Production]
#: a shadow's answer to one call: bytes, a merged answer's part for the call, why it could not be cut, or None
Answer = bytes | list[Tensor] | TensorError | None


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
        self._queue: deque[Copy] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: the queue's head, already parsed for merging (batch > 1): (the queued copy, it as mergeable)
        self._head: tuple[Copy, Mergeable | None] | None = None
        #: batch > 1: copies taken from the queue that have not finished
        self._sending = 0
        #: batch > 1: now and then a merged call is also sent alone, and merging stops if its answers differ
        self.merge_check = MergeCheck(spec.batch_check)
        self._closed = False
        self._warned = False
        #: the copies' own HTTP/2 connection (transport h2), else None: the upstream's grpc.aio channel
        self._h2 = copy_channel(spec.transport, target.spec, target.max_message_size)

    @property
    def transport(self) -> str:
        """How copies travel: ``h2`` or ``grpc``."""
        return "grpc" if self._h2 is None else "h2"

    def same_as(self, spec: Shadow, target: UpstreamTarget, compare: Compare, promotion: Promotion) -> bool:
        """Whether a reload may keep this mirror (and its statistics) for the given settings."""
        return (spec, target, compare, promotion) == (self.spec, self.target, self.compare_spec, self.promotion)

    @property
    def inflight(self) -> int:
        """Copies taken from the queue and not yet finished (with batch > 1, a request carries several)."""
        return self._sending if self.spec.batch > 1 else len(self._tasks)

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
        elif self._has_room():
            try:
                request = record.request if redacted is None else redacted.value()
            except TensorError:
                self.stats.dropped("unredactable")
                return
            # batch > 1: sent when the pass ends (flush), merged with the pass's other calls
            if spec.batch > 1 or len(self._tasks) >= spec.max_inflight:
                self._queue.append((record, request, production))
            elif self._admit():
                task = asyncio.get_running_loop().create_task(self._work(record, request, production))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            self.stats.dropped("queue_full")

    def _has_room(self) -> bool:
        spec = self.spec
        if spec.batch > 1:
            return len(self._queue) < spec.queue_size + spec.batch * max(0, spec.max_inflight - len(self._tasks))
        return len(self._tasks) < spec.max_inflight or len(self._queue) < spec.queue_size

    def flush(self) -> None:
        """End of a dispatch pass: send what waits, merged up to ``batch`` calls per request (batch > 1 only)."""
        if self._closed:
            return
        # each task takes its copies when it starts, so a task cancelled before it runs leaves them queued
        starting = min(self.spec.max_inflight - len(self._tasks), -(-len(self._queue) // self._batch))
        for _ in range(starting):
            task = asyncio.get_running_loop().create_task(self._work_merged())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def _batch(self) -> int:
        """Copies per request now: ``batch``, or 1 once a check found that merging changes the answers."""
        return self.spec.batch if self.merge_check.off is None else 1

    def _mergeable(self, copy: Copy) -> Mergeable | None:
        record, request, _ = copy
        if record.method != MODEL_INFER:
            return None
        return mergeable(request, self._headers(record.metadata))

    def _take(self) -> list[tuple[Copy, Mergeable | None]]:
        """The next request's copies, from the queue's front: the first the circuit admits, then those that merge
        with it, up to ``batch``. Empty when the queue ran out."""
        while self._queue:
            copy = self._queue.popleft()
            head, self._head = self._head, None
            first = head[1] if head is not None and head[0] is copy else self._mergeable(copy)
            if not self._admit():
                continue
            copies = [(copy, first)]
            while first is not None and self._queue and len(copies) < self._batch:
                following = self._queue[0]
                other = self._mergeable(following)
                if other is None or other.key != first.key:
                    self._head = (following, other)
                    break
                copies.append((self._queue.popleft(), other))
            self._sending += len(copies)
            return copies
        return []

    async def _work_merged(self) -> None:
        """Send the queue's copies, merged up to ``batch`` per request, until it is empty."""
        while copies := self._take():
            try:
                if len(copies) == 1:
                    await self._mirror(*copies[0][0])
                else:
                    await self._mirror_merged(copies)
            finally:
                self._sending -= len(copies)

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
        metadata = (*self._headers(record.metadata), (SHADOW, self.name))
        answer, code, seconds = await self._send(record.method, request, metadata, 1)
        self.stats.finished(code.name, seconds)
        self._judge_safely(record, production, answer, seconds)

    async def _mirror_merged(self, copies: list[tuple[Copy, Mergeable | None]]) -> None:
        """One request for several ``ModelInfer`` copies; its answer is cut back into each call's rows."""
        merging = [merge for _, merge in copies if merge is not None]
        record = copies[0][0][0]
        metadata = (*shared_metadata(self._headers(record.metadata)), (SHADOW, self.name))
        self.stats.merged[0] += 1
        self.stats.merged[1] += len(copies)
        number = self.stats.merged[0]
        answer, code, seconds = await self._send(record.method, merged_request(merging), metadata, len(copies))
        parts: list[list[Tensor]] | TensorError | None = None
        if answer is not None:
            try:
                parts = split(answer, [merge.rows for merge in merging])
            except TensorError as exc:
                parts = exc
        for i, ((call, _, production), _) in enumerate(copies):
            self.stats.finished(code.name, seconds)
            outputs = parts if parts is None or isinstance(parts, TensorError) else parts[i]
            self._judge_safely(call, production, outputs, seconds)
        if self.merge_check.due(number) and (parts is not None or code not in UNREACHED):
            call, request, _ = copies[0][0]
            alone, _ = await self._copy(call.method, request, (*self._headers(call.metadata), (SHADOW, self.name)))
            merged = parts[0] if isinstance(parts, list) else parts if parts is not None else code
            self.merge_check.judge(merged, alone, self.name, self.route)

    async def _send(
        self, method: str, request: bytes, metadata: tuple, calls: int
    ) -> tuple[bytes | None, grpc.StatusCode, float]:
        """One request to the shadow, told to its circuit breaker: (the answer or None, its code, seconds).
        When cancelled, each of its ``calls`` is counted ``CANCELLED`` before the cancellation goes on."""
        started = time.perf_counter()
        try:
            answer, code = await self._copy(method, request, metadata)
        except asyncio.CancelledError:  # close(): a reload or promotion removed the shadow, or the proxy stops
            self.target.breaker.record(grpc.StatusCode.CANCELLED)
            for _ in range(calls):
                self.stats.finished(grpc.StatusCode.CANCELLED.name, time.perf_counter() - started)
            raise
        if code is _OK:
            self.target.breaker.record_success()
        else:
            self.target.breaker.record(code)
        return answer, code, time.perf_counter() - started

    def _judge_safely(self, record: CallRecord, production: Production, answer: Answer, seconds: float) -> None:
        """``_judge``, where a comparator bug costs one comparison and is logged once."""
        try:
            self._judge(record, production, answer, seconds)
        except Exception:  # a comparator bug must cost one comparison, never the worker
            self.stats.compared(Comparison(matched=False, agree=0, samples=0, error="internal"))
            if not self._warned:
                self._warned = True
                log.exception(
                    "shadow %s of route %s: comparison failed (further errors only counted)", self.name, self.route
                )

    async def _copy(self, method: str, request: bytes, metadata: tuple) -> tuple[bytes | None, grpc.StatusCode]:
        """Send one request: (the shadow's answer or None, its code)."""
        if self._h2 is not None:
            return await self._h2.unary(method, request, metadata, self.spec.timeout)
        call = self.target.stub("unary_unary", method)(request, metadata=metadata, timeout=self.spec.timeout)
        try:
            return await call, _OK
        except grpc.aio.AioRpcError as error:
            return None, error.code()
        except asyncio.CancelledError:
            call.cancel()
            raise

    def _judge(self, record: CallRecord, production: Production, answer: Answer, seconds: float) -> None:
        """Compare and add the call to the window; ``answer`` is the shadow's (bytes, or a merged answer's part
        for this call, or why it could not be cut), None when the copy failed."""
        comparison = None
        if production is not None and answer is not None:
            if isinstance(answer, bytes):
                comparison = self._comparator.compare(production, answer)
            else:
                comparison = self._comparator.compare_outputs(production, answer)
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
        self._head = None
        for task in list(self._tasks):
            task.cancel()
        if self._h2 is not None:
            self._h2.close()

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
        for shadow in self.shadows:
            if shadow.spec.batch > 1:
                shadow.flush()

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

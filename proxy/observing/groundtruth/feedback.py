"""Where outcomes arrive: the ``mlmirror.v1.Feedback/ReportOutcome`` gRPC method (on the proxy's listener) and
``POST /outcomes`` (admin HTTP, JSON). Each outcome goes to the route whose ground-truth store knows its request id.

JSON body: ``{"outcomes": [{"request_id": "...", "labels": ["setosa"]}, {"request_id": "...", "values": [3.2]}]}``;
the answer counts them by result, as ``ReportOutcomeResponse`` does. An outcome that arrives before its prediction
is parked (proxy/observing/groundtruth/park.py) and counted ``early``; it is joined when the prediction lands, or
counted ``unknown`` once ``feedback.early_ttl`` has passed. Each outcome is also offered to the routes'
captures, which append it to their files when they captured the call (see proxy/observing/capture/writer.py).

Where a call enters (a listener, ``feedback.listen``) its handler is guarded by a ``FeedbackGate``
(proxy/observing/groundtruth/access.py): no credential, no outcome. The relay from a worker to the observing process
is internal and unguarded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf.message import DecodeError
from mlmirror.observing.groundtruth.outcomes import OUTCOME_RESULTS, GroundTruthStore
from mlmirror.observing.groundtruth.park import OutcomePark
from mlmirror.protocol.names import FEEDBACK_SERVICE
from mlmirror.protos import feedback_pb2

if TYPE_CHECKING:  # access.py opens feedback.listen with serve_feedback_only
    from mlmirror.observing.groundtruth.access import FeedbackGate

__all__ = ["REPORT_RESULTS", "FeedbackRelay", "FeedbackService", "parse_outcomes_json", "serve_feedback_only"]

#: what a report answers, per outcome: a store's result, or ``early`` (parked until its prediction lands)
REPORT_RESULTS = (*OUTCOME_RESULTS, "early")

Outcome = tuple[str, Sequence[float], Sequence[str]]
Behaviour = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def _handler(behaviour: Behaviour, gate: FeedbackGate | None) -> grpc.GenericRpcHandler:
    """The ``mlmirror.v1.Feedback`` service answering with ``behaviour``, behind ``gate`` when given."""
    if gate is not None:
        inner = behaviour

        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await gate.admit(context)
            return await inner(request, context)

    method: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(behaviour)
    return grpc.method_handlers_generic_handler(FEEDBACK_SERVICE, {"ReportOutcome": method})


async def serve_feedback_only(
    address: str, handler: grpc.GenericRpcHandler, *, reuse_port: bool
) -> tuple[grpc.aio.Server, int]:
    """A plain gRPC listener (``feedback.listen``) serving only ``handler``; (server, bound port). ``reuse_port``:
    the serving workers share it. Raises OSError when it cannot bind."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    server.add_generic_rpc_handlers((handler,))
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    return server, port


class OutcomeSink(Protocol):
    """Something that keeps outcomes besides the ground-truth stores (a route's capture)."""

    def offer_outcome(self, request_id: str, values: Sequence[float], labels: Sequence[str]) -> bool: ...


class FeedbackService:
    """Joins outcomes with predictions. ``stores()`` gives the current routes' ground-truth stores.

    The gRPC method takes raw bytes and parses them itself, so that a malformed request gets INVALID_ARGUMENT with
    the reason rather than gRPC's generic UNKNOWN."""

    def __init__(
        self,
        stores: Callable[[], Iterable[GroundTruthStore]],
        sinks: Callable[[], Iterable[OutcomeSink]] = tuple,
        park: OutcomePark | None = None,
    ) -> None:
        """``park``: where outcomes that arrive before their prediction wait (none: they are ``unknown``)."""
        self._stores = stores
        self._sinks = sinks
        self.park = park if park is not None else OutcomePark(0, 1.0)
        self._unknown = 0  # not parked and known nowhere (counted on the event loop)

    @property
    def unknown(self) -> int:
        """Outcomes no route knew (counted apart: they belong to no route), parked ones once dropped unjoined."""
        return self._unknown + self.park.expired + self.park.evicted

    def attach(self) -> list[GroundTruthStore]:
        """Give the current stores the park, so that a prediction landing there takes its early outcome; the
        stores. Called at every report, and by the proxy whenever it installs a route table."""
        stores = list(self._stores())
        for store in stores:
            store.park = self.park
        return stores

    def report(self, outcomes: Iterable[Outcome]) -> dict[str, int]:
        counts = dict.fromkeys(REPORT_RESULTS, 0)
        stores = self.attach()
        sinks = list(self._sinks())

        def known(request_id: str) -> bool:
            return any(s.knows(request_id) for s in stores)

        for request_id, values, labels in outcomes:
            for sink in sinks:
                sink.offer_outcome(request_id, values, labels)
            # no ground-truth store at all: no prediction will land, nothing to wait for
            if stores and self.park.park_unless(known, request_id, (values, labels)):
                counts["early"] += 1
                continue
            store = next((s for s in stores if s.knows(request_id)), None)
            if store is None:
                self._unknown += 1
                counts["unknown"] += 1
            else:
                counts[store.report(request_id, values, labels)] += 1
        return counts

    def handler(self, gate: FeedbackGate | None = None) -> grpc.GenericRpcHandler:
        """The ``mlmirror.v1.Feedback`` service, to add to a server; calls pass ``gate`` first when given."""
        return _handler(self._report_outcome, gate)

    async def _report_outcome(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            message = feedback_pb2.ReportOutcomeRequest.FromString(request)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a ReportOutcomeRequest: {exc}")
        counts = self.report((o.request_id, list(o.values), list(o.labels)) for o in message.outcomes)
        return feedback_pb2.ReportOutcomeResponse(**counts).SerializeToString()


class FeedbackRelay:
    """A worker's ``mlmirror.v1.Feedback``: each call is relayed, bytes untouched, to the hub that holds the
    predictions (``serve --workers N``); the hub's answer or error is the client's."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            f"/{FEEDBACK_SERVICE}/ReportOutcome"
        )

    def handler(self, gate: FeedbackGate | None = None) -> grpc.GenericRpcHandler:
        """The relaying ``mlmirror.v1.Feedback`` service; calls pass ``gate`` first when given."""
        return _handler(self._report_outcome, gate)

    async def _report_outcome(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        try:
            return await self._call(request, timeout=10.0 if remaining is None else remaining)
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")

    async def close(self) -> None:
        await self._channel.close()


def parse_outcomes_json(body: bytes) -> list[Outcome]:
    """The outcomes of a ``POST /outcomes`` body; raises ValueError saying what is wrong."""
    try:
        document = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    items = document.get("outcomes") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ValueError('expected {"outcomes": [{"request_id": ..., "labels": [...] or "values": [...]}, ...]}')
    outcomes: list[Outcome] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("request_id"), str):
            raise ValueError(f"outcomes[{i}]: needs a string request_id")
        values, labels = item.get("values", []), item.get("labels", [])
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(f"outcomes[{i}].values: expected a list of numbers")
        if not isinstance(labels, list):
            raise ValueError(f"outcomes[{i}].labels: expected a list")
        outcomes.append((item["request_id"], [float(v) for v in values], [str(v) for v in labels]))
    return outcomes

"""Drift monitoring of a route as a per-route part (proxy/observing/parts.py): config ``routes[].drift``.

The factory loads the route's reference profile (when one is named) and checks it holds the configured features, so
a profile that cannot be used refuses the start, or the reload, before anything has changed. A reload keeps the
engine (its windows, reference and ground truth) when the drift settings are unchanged. At start, once the proxy
listens, the profile is checked against the inputs the route's model declares (KServe ``ModelMetadata``).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from mlmirror.config import Drift, Route
from mlmirror.errors import StartError
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.engine import YIELD_EVERY, YIELD_EVERY_OBSERVING, DriftEngine
from mlmirror.observing.drift.metadata_check import fit_profile, model_inputs
from mlmirror.observing.drift.reference import Reference
from mlmirror.observing.drift.report import DriftCollector, drift_status
from mlmirror.observing.parts import PartContext, PartKind, RoutePart
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["KIND", "DriftPart", "load_profile"]

log = logging.getLogger(__name__)


class DriftPart(RoutePart):
    """A route's drift engine (``engine``), with the ground-truth store it keeps."""

    def __init__(self, route: Route, context: PartContext) -> None:
        assert route.drift is not None
        self.route = route.name
        self.model = route.match.model or ""
        self.engine = DriftEngine(
            route.name, route.drift, load_profile(route.name, route.drift),
            yield_every=YIELD_EVERY if context.serving else YIELD_EVERY_OBSERVING, wait=context.wait_for_serving,
        )  # fmt: skip
        self.name = self.engine.name

    def offer(self, record: CallRecord) -> None:
        self.engine.offer(record)

    def status(self) -> object:
        return drift_status(self.engine)

    def reloaded(self, route: Route, context: PartContext) -> RoutePart:
        return self if route.drift == self.engine.spec else DriftPart(route, context)

    async def check(self, first: UpstreamTarget) -> None:
        engine = self.engine
        if engine.spec.profile is None or engine.reference is None:
            return
        try:
            inputs = await model_inputs(first.channel, self.model)
        except (grpc.aio.AioRpcError, ValueError) as exc:
            reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("route %s: cannot check profile %s against %s's metadata (%s); starting anyway",
                        self.route, engine.spec.profile, first.name, reason)  # fmt: skip
            return
        problems = fit_profile(engine, inputs)  # binds a profile that names no input to the model's
        if problems:
            raise StartError(
                f"route {self.route}: profile {engine.spec.profile} does not fit the inputs of {first.name}: "
                + "; ".join(problems)
            )

    def start(self) -> None:
        self.engine.start()

    def close(self, successor: RoutePart | None) -> None:
        self.engine.stop()

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)


def load_profile(route: str, spec: Drift) -> Reference | None:
    """The reference profile ``spec`` names, checked against the configured features; None: capture it live."""
    if spec.profile is None:
        return None
    try:
        reference = Reference.load(spec.profile)
    except ValueError as exc:
        raise StartError(f"route {route}: {exc}") from None
    missing = {f.name for f in spec.features} - set(reference.schema.names())
    if missing:
        raise StartError(
            f"route {route}: profile {spec.profile} has no series {sorted(missing)} (it has {reference.schema.names()})"
        )
    return reference


KIND = PartKind(
    key="drift",
    configured=lambda route: route.drift is not None,
    build=DriftPart,
    collector=lambda parts: DriftCollector(lambda: [part.engine for part in parts()]),
)

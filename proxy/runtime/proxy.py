"""The running proxy: listener, admin endpoint, health checks, reload and graceful stop.

Lifecycle: ``start()`` binds the gRPC listener (generic relay handler — or, in observer mode, Envoy's ext_proc
service — plus grpc.health.v1 and server reflection) and the admin HTTP endpoint, and starts one health-check loop
per upstream. ``reload(config)`` swaps in a new route table; calls already running finish on the old one, and
upstreams only the old one used are closed once it has drained. ``stop(grace)`` stops in a fixed order: report
not-serving, stop accepting and drain in-flight calls for up to ``grace`` seconds, then stop health checks, close
upstream channels and the admin endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mlmirror import __version__
from mlmirror.admin.http import AdminServer, Request, Response, answer_promotion, endpoints
from mlmirror.config import Config, Drift, Route, load_config
from mlmirror.errors import ConfigError, StartError
from mlmirror.eventloop import loop_name
from mlmirror.handoff.tap import Observer, Tap
from mlmirror.looplag import LoopLag
from mlmirror.metrics import Metrics
from mlmirror.observing.capture.writer import CaptureCollector, CaptureStats, CaptureWriter
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.metadata_check import fit_profile, model_inputs
from mlmirror.observing.drift.reference import Reference
from mlmirror.observing.drift.report import DriftCollector, drift_status
from mlmirror.observing.exposure import observer_warnings
from mlmirror.observing.extproc import EXT_PROC_SERVICE, ExtProcObserver
from mlmirror.observing.groundtruth.access import FeedbackEntrances
from mlmirror.observing.groundtruth.feedback import FeedbackRelay, FeedbackService, parse_outcomes_json
from mlmirror.observing.shadows.headers import HandoffFilter
from mlmirror.observing.shadows.mirror import RouteMirror, ShadowMirror
from mlmirror.observing.shadows.promotion import PromotionError, promoted_config
from mlmirror.observing.shadows.report import ShadowCollector, shadow_status
from mlmirror.protos import FEEDBACK_SERVICE, INFERENCE_SERVICE
from mlmirror.runtime.role import ALONE, Role
from mlmirror.serving.handler import ProxyHandler, TableSource
from mlmirror.serving.sampling import RequestIds
from mlmirror.serving.table import RouteTable
from mlmirror.serving.upstream import UpstreamTarget
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

__all__ = ["Proxy"]

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Proxy:
    """One mlmirror proxy process (or an in-process instance in tests)."""

    def __init__(
        self,
        config: Config,
        *,
        observers: Sequence[Observer] = (),
        metrics: Metrics | None = None,
        role: Role = ALONE,
    ) -> None:
        self.role = role
        self.metrics = metrics if metrics is not None else Metrics()
        self.tap = Tap(observers, self.metrics.observer_errors)
        self.ids = RequestIds()
        self.lag = LoopLag(config.mirror_shed_lag)
        self._shadows: dict[tuple[str, str], ShadowMirror] = {}
        self._drift: dict[str, DriftEngine] = {}
        self._captures: dict[str, CaptureWriter] = {}
        self._capture_stats: dict[str, CaptureStats] = {}
        #: closed writers whose thread may still be writing what was queued (joined on stop)
        self._retired_captures: list[CaptureWriter] = []
        self.feedback = FeedbackService(
            lambda: [e.ground_truth for e in self._drift.values() if e.ground_truth is not None],
            lambda: list(self._captures.values()),  # captured calls get their outcomes appended
        )
        self._feedback_relay = FeedbackRelay(role.feedback_target) if role.feedback_target else None
        self.promotions: list[dict[str, object]] = []
        self._first_config = config
        self._entrances = FeedbackEntrances(
            config, self.metrics.registry, listen=self.listen_address, tls=bool(config.tls and config.tls.client_ca),
            admin=self.admin_address, admin_token=admin_token(config), internal=role.hub,
        )  # fmt: skip
        self.table: RouteTable | None = None
        self._live_tables: set[RouteTable] = set()
        self._handler = ProxyHandler(cast(TableSource, self))  # serves only once start() has loaded a table
        self._health = health.aio.HealthServicer()
        self._health_tasks: dict[UpstreamTarget, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._server: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.draining = False
        self.started_at = 0.0
        self.grpc_port = 0
        self.metrics.inflight_calls.set_function(self.inflight_calls)
        self.metrics.event_loop_lag.set_function(lambda: self.lag.lag)
        self.metrics.mirror_shedding.set_function(lambda: 1 if self.lag.overloaded else 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics.process_tasks.set_function(self.tasks)
        self.metrics.registry.register(ShadowCollector(self._route_mirrors))
        self.metrics.registry.register(DriftCollector(lambda: list(self._drift.values())))
        self.metrics.registry.register(CaptureCollector(lambda: list(self._captures.values())))

    # --- start ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving. Raises ``StartError`` (after releasing what it had started) when the listener or
        the admin endpoint cannot bind, or a TLS file cannot be read."""
        config = self._first_config
        self._loop = asyncio.get_running_loop()
        self._install_table(self._build_table(config, {}))
        self.lag.start()
        try:
            self._server = await self._start_listener(config)
            try:
                await self._entrances.start((self._feedback_relay or self.feedback).handler, shared=self.role.worker)
            except OSError as exc:
                raise StartError(f"cannot serve feedback.listen: {exc}") from None
            admin = self.admin_address
            if admin is not None:
                self._admin = AdminServer(admin, endpoints(self), token=admin_token(config),
                                          self_checked=frozenset({"/outcomes"}))  # fmt: skip
                try:
                    await self._admin.start()
                except OSError as exc:
                    self._admin = None
                    raise StartError(f"cannot serve the admin endpoint on {admin}: {exc.strerror or exc}") from None
        except BaseException:
            await self.stop(grace=0)
            raise
        try:
            await self._check_profiles(config)
        except BaseException:
            await self.stop(grace=0)
            raise
        self.started_at = time.time()
        self.metrics.config_reloads.labels("success")  # both series exist from the start
        self.metrics.config_reloads.labels("failure")
        self.metrics.config_last_reload_success.set(self.started_at)
        await self._refresh_serving_status()
        for warning in [] if self.role.hub else observer_warnings(config, self.listen_address):
            log.warning("%s", warning)
        log.info(
            "mlmirror %s%s: gRPC on %s (port %d)%s, admin on %s; %d routes, %d upstreams; event loop %s",
            __version__,
            "" if self.role.kind == "alone" else f" ({self.role.kind})",
            self.listen_address,
            self.grpc_port,
            " with TLS" if config.tls else "",
            f"http://{self.admin_address}" if self.admin_address else "(none)",
            len(config.routes),
            len(config.upstreams),
            loop_name(),
        )

    @property
    def listen_address(self) -> str:
        return self.role.listen or self._first_config.listen

    @property
    def admin_address(self) -> str | None:
        """The admin endpoint's address: the config's, a worker's internal one, none for the hub."""
        if self.role.kind == "alone":
            return self._first_config.admin
        return self.role.admin

    async def _start_listener(self, config: Config) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_size),
                ("grpc.max_send_message_length", config.max_message_size),
                # Workers share their port on purpose; otherwise a second proxy on the port must fail, not share it.
                ("grpc.so_reuseport", 1 if self.role.worker else 0),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        feedback = self._feedback_relay or self.feedback
        server.add_generic_rpc_handlers((feedback.handler(self._entrances.listener),))
        if self.role.hub:
            served = FEEDBACK_SERVICE
        elif config.mode == "observer":
            observer = ExtProcObserver(cast(TableSource, self), self.metrics.extproc_streams, config.max_message_size)
            self.metrics.extproc_active_streams.set_function(lambda: observer.active)
            external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(observer, server)
            served = EXT_PROC_SERVICE
        else:
            server.add_generic_rpc_handlers((self._handler,))
            served = INFERENCE_SERVICE
        services = dict.fromkeys((served, FEEDBACK_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME))
        reflection.enable_server_reflection(tuple(services), server)
        listen = self.listen_address
        try:
            if config.tls is None or self.role.hub:
                self.grpc_port = server.add_insecure_port(listen)
            else:
                self.grpc_port = server.add_secure_port(listen, _server_credentials(config))
        except (RuntimeError, OSError) as exc:
            raise StartError(f"cannot listen on {listen}: {exc}") from None
        await server.start()
        return server

    async def _check_profiles(self, config: Config) -> None:
        """Refuse to start when a route's drift profile does not fit the inputs its model declares."""
        assert self.table is not None
        for route in self.table.routes:
            engine = self._drift.get(route.name)
            if engine is None or engine.spec.profile is None or engine.reference is None:
                continue
            target = route.chain[0]
            try:
                inputs = await model_inputs(target.channel, route.spec.match.model or "")
            except (grpc.aio.AioRpcError, ValueError) as exc:
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning("route %s: cannot check profile %s against %s's metadata (%s); starting anyway",
                            route.name, engine.spec.profile, target.name, reason)  # fmt: skip
                continue
            problems = fit_profile(engine, inputs)  # binds a profile that names no input to the model's
            if problems:
                raise StartError(
                    f"route {route.name}: profile {engine.spec.profile} does not fit the inputs of {target.name}: "
                    + "; ".join(problems)
                )

    def inflight_calls(self) -> int:
        """Client calls being served, on the current route table and on retired ones still draining."""
        return sum(table.inflight for table in self._live_tables)

    def tasks(self) -> int:
        """asyncio tasks not yet done on the event loop the proxy started on (0 before ``start``)."""
        return len(asyncio.all_tasks(self._loop)) if self._loop is not None else 0

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin is not None else None

    def _build_targets(self, config: Config, current: dict[str, UpstreamTarget]) -> dict[str, UpstreamTarget]:
        """Targets for ``config``: unchanged upstreams keep their channel and circuit state; others are new."""
        max_size = self._first_config.max_message_size  # fixed for the process: listener and channels agree
        targets = {}
        for name, spec in config.upstreams.items():
            existing = current.get(name)
            if existing is not None and existing.spec == spec:
                targets[name] = existing
            else:
                target = UpstreamTarget(spec, max_message_size=max_size, metrics=self.metrics)
                targets[name] = target
                self._health_tasks[target] = asyncio.get_running_loop().create_task(self._health_loop(target))
        return targets

    def _build_table(self, config: Config, current: dict[str, UpstreamTarget]) -> RouteTable:
        """A route table for ``config``. Shadows whose settings and upstream are unchanged keep their mirror (and
        statistics); the others get a new one, and mirrors no longer configured are closed."""
        if self.role.worker:  # shadows, drift and captures live in the hub: watched routes' calls go there
            assert self.role.handoff is not None
            # sampled at the door first, then only the metadata some shadow carries (HandoffFilter)
            handoff = {route.name: HandoffFilter(self.role.handoff.door(route), route) for route in config.routes
                       if watched(route)}  # fmt: skip
            targets = self._build_targets(config, current)
            return RouteTable(config, targets, self.metrics, self.tap, {}, self.ids, handoff)
        _make_capture_dirs(config)  # first, with the drift profiles: either may refuse the config
        drift = self._drift_engines(config)
        self._drift = drift
        self._captures = self._capture_writers(config)
        targets = self._build_targets(config, current)
        shadows: dict[tuple[str, str], ShadowMirror] = {}
        mirrors: dict[str, RouteMirror] = {}
        for route in config.routes:
            if not route.shadows:
                continue
            for spec in route.shadows:
                key = (route.name, spec.name)
                target = targets[spec.upstream]
                existing = self._shadows.get(key)
                if existing is not None and existing.same_as(spec, target, route.compare, route.promotion):
                    shadows[key] = existing
                else:
                    shadows[key] = ShadowMirror(route.name, spec, target, route.compare, route.promotion, self.lag)
            mirrors[route.name] = RouteMirror(
                route.name, [shadows[(route.name, s.name)] for s in route.shadows], route.promotion, route.redact
            )
        for key, mirror in self._shadows.items():
            if shadows.get(key) is not mirror:
                mirror.close()
        self._shadows = shadows
        return RouteTable(config, targets, self.metrics, self.tap, mirrors, self.ids, self._drift, self._captures)

    def _capture_writers(self, config: Config) -> dict[str, CaptureWriter]:
        """A capture writer per route with ``capture``: kept across reloads when its settings and redaction are
        unchanged. A replaced writer is closed; its successor's thread waits for it before writing."""
        writers: dict[str, CaptureWriter] = {}
        for route in config.routes:
            if route.capture is None:
                continue
            existing = self._captures.get(route.name)
            if existing is not None and (existing.spec, existing.redact) == (route.capture, route.redact):
                writers[route.name] = existing
        closing = [w for name, w in self._captures.items() if writers.get(name) is not w]
        for writer in closing:
            writer.close()
        self._retired_captures = [w for w in (*self._retired_captures, *closing) if w.alive]
        for route in config.routes:
            if route.capture is None or route.name in writers:
                continue
            after = [w for w in self._retired_captures if w.route == route.name or w.spec.path == route.capture.path]
            stats = self._capture_stats.setdefault(route.name, CaptureStats())
            writers[route.name] = CaptureWriter(route.name, route.capture, route.redact, stats, after)
            writers[route.name].start()
        return writers

    def _drift_engines(self, config: Config) -> dict[str, DriftEngine]:
        """A drift engine per route with ``drift``: kept across reloads when its settings are unchanged. A profile
        that cannot be read, or that does not hold the configured features, stops the start (or the reload) before
        anything has changed."""
        kept: dict[str, DriftEngine] = {}
        references: dict[str, Reference | None] = {}
        for route in config.routes:
            if route.drift is None:
                continue
            existing = self._drift.get(route.name)
            if existing is not None and existing.spec == route.drift:
                kept[route.name] = existing
            else:
                references[route.name] = _load_profile(route.name, route.drift)
        engines = dict(kept)
        for route in config.routes:
            if route.name in references:
                assert route.drift is not None
                engines[route.name] = DriftEngine(route.name, route.drift, references[route.name])
                engines[route.name].start()
        for name, engine in self._drift.items():
            if engines.get(name) is not engine:
                engine.stop()
        return engines

    def _route_mirrors(self) -> list[RouteMirror]:
        """The shadow mirrors of the current route table."""
        table = self.table
        return [] if table is None else [route.mirror for route in table.routes if route.mirror is not None]

    def _install_table(self, table: RouteTable) -> None:
        self.table = table
        self._live_tables.add(table)
        self._handler.invalidate()

    # --- health and readiness ---------------------------------------------------------------------------------

    async def _health_loop(self, target: UpstreamTarget) -> None:
        while True:
            await target.check_health()
            await self._refresh_serving_status()
            await asyncio.sleep(target.spec.health_check.interval)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, reason per route): ready when not draining and every route has a reachable, non-ejected
        upstream. A static default does not count: it answers, but it is not a model."""
        assert self.table is not None
        if self.draining:
            return False, {"proxy": "draining: shutting down"}
        if self.role.hub:  # the workers carry the calls
            return True, {"proxy": "hub: watching the calls the workers hand off"}
        if self._first_config.mode == "observer":  # Envoy carries the calls; the observer needs no upstream
            return True, {"proxy": "observing calls streamed by Envoy (ext_proc)"}
        reasons = {}
        ready = True
        for route in self.table.routes:
            route_ready, reasons[route.name] = route.readiness()
            ready = ready and route_ready
        return ready, reasons

    async def _refresh_serving_status(self) -> None:
        if self.draining:
            return
        ready, _ = self.readiness()
        self.metrics.ready.set(1 if ready else 0)
        status = _SERVING if ready else _NOT_SERVING
        await self._health.set("", status)
        await self._health.set(INFERENCE_SERVICE, status)

    # --- reload -----------------------------------------------------------------------------------------------

    async def reload(self, config: Config) -> None:
        """Serve new calls with ``config``. Listener, admin, TLS and size settings need a restart; changes to them
        are logged and ignored."""
        old = self.table
        assert old is not None
        for setting in ("mode", "listen", "admin", "tls", "max_message_size", "feedback"):
            if getattr(config, setting) != getattr(old.config, setting):
                log.warning("reload: %s changed; it takes effect only after a restart", setting)
        table = self._build_table(config, old.targets)
        self._install_table(table)
        old.retire()
        kept = set(table.targets.values())
        removed = [target for target in old.targets.values() if target not in kept]
        self._spawn(self._retire_table(old, removed))
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload_success.set(time.time())
        log.info(
            "config reloaded from %s: %d routes, %d upstreams", config.source, len(config.routes), len(config.upstreams)
        )
        await self._refresh_serving_status()

    async def reload_from_file(self, path: str | None = None) -> bool:
        """Reload from ``path`` (default: the file the current config came from). An invalid file is rejected,
        logged and counted, and the current config stays."""
        assert self.table is not None
        source = path or self.table.config.source
        try:
            config = load_config(source)
            await self.reload(config)
        except (ConfigError, StartError) as exc:
            self.metrics.config_reloads.labels("failure").inc()
            log.error("config reload rejected, keeping the current config: %s", exc)
            return False
        return True

    async def _retire_table(self, table: RouteTable, removed: list[UpstreamTarget]) -> None:
        await table.drained.wait()
        self._live_tables.discard(table)
        for target in removed:
            task = self._health_tasks.pop(target, None)
            if task is not None:
                task.cancel()
            await target.close()

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- stop -------------------------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish for up to ``grace`` seconds (default: the config's
        ``shutdown_grace``), then release everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.draining = True
        assert self.table is not None
        grace = self.table.config.shutdown_grace if grace is None else grace
        self.metrics.ready.set(0)
        await self._health.enter_graceful_shutdown()
        log.info("stopping: draining %d in-flight calls (grace %.1fs)", self.inflight_calls(), grace)
        if self._server is not None:
            await self._server.stop(grace)
        current = asyncio.current_task()  # stop() may itself run as a background task (signal handler)
        tasks = [task for task in (*self._health_tasks.values(), *self._background) if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                log.warning("stopping: %d background tasks did not finish within 5s", len(stuck))
        for mirror in self._shadows.values():
            mirror.close()
        for engine in self._drift.values():
            await asyncio.to_thread(engine.stop)
        for writer in (*self._captures.values(), *self._retired_captures):
            await asyncio.to_thread(writer.stop)  # writes what is queued, flushes, closes
        await self.lag.stop()
        for target in {t for table in self._live_tables for t in table.targets.values()}:
            await target.close()
        if self._admin is not None:
            await self._admin.close()
        await self._entrances.stop()
        if self._feedback_relay is not None:
            await self._feedback_relay.close()
        log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT (graceful stop; a second one exits at once); SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_stop_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("%s again: exiting without waiting for in-flight calls", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: graceful stop", signal.Signals(signum).name)
            self._spawn(self.stop())

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload_from_file()))
        try:
            await self._stopped.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    # --- admin endpoints --------------------------------------------------------------------------------------

    async def _get_metrics(self, request: Request) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

    async def _get_healthz(self, request: Request) -> Response:
        return Response.text("ok")

    async def _get_readyz(self, request: Request) -> Response:
        ready, reasons = self.readiness()
        lines = [f"{name}: {reason}" for name, reason in reasons.items()]
        return Response.text("\n".join(["ready" if ready else "not ready", *lines]), 200 if ready else 503)

    async def _get_status(self, request: Request) -> Response:
        return Response.json(self.status())

    async def _post_reload(self, request: Request) -> Response:
        if await self.reload_from_file():
            return Response.text("reloaded")
        return Response.text("reload rejected; the current config stays (see the proxy's log)", 400)

    async def handle_outcomes(self, request: Request) -> Response:
        """``POST /outcomes``: ground truth as JSON (see proxy/observing/groundtruth/feedback.py); answers the counts
        by result."""
        refused = self._entrances.refuse_http(request.headers)
        if refused is not None:
            return Response.text(refused[1], refused[0])
        try:
            outcomes = parse_outcomes_json(request.body)
        except ValueError as exc:
            return Response.text(f"bad outcomes: {exc}", 400)
        return Response.json(self.feedback.report(outcomes))

    async def _post_promote(self, request: Request) -> Response:
        """``POST /promote?route=R&shadow=S[&force=1]``: make shadow S the primary of route R."""
        return await answer_promotion(request, lambda r, s, f: self.promote(r, s, force=f), PromotionError)

    async def promote(self, route: str, shadow: str, *, force: bool = False) -> str:
        """Make ``shadow`` the primary of ``route`` (a table swap: no call fails). Unless ``force``, only when its
        verdict says promotable. Raises ``PromotionError``; returns what was done, in words."""
        assert self.table is not None
        config = promoted_config(self.table.config, route, shadow)  # checks the names first
        runtime = next(r for r in self.table.routes if r.name == route)
        verdict = runtime.mirror.verdicts()[shadow][1] if runtime.mirror is not None else None
        if not force and (verdict is None or not verdict.promotable):
            reasons = "; ".join(verdict.reasons) if verdict is not None else "its verdict is kept by the hub"
            raise PromotionError(f"shadow {shadow!r} is not promotable: {reasons} (force=1 overrides)")
        old_primary = runtime.spec.primary
        await self.reload(config)
        new_primary = next(r for r in config.routes if r.name == route).primary
        forced = " [forced]" if verdict is None or not verdict.promotable else ""
        message = (
            f"route {route}: primary is now {new_primary} (was {old_primary}, now "
            f"{runtime.spec.promotion.demote_to}){forced}"
        )
        self.promotions.append({"time": time.time(), "route": route, "shadow": shadow, "detail": message})
        log.warning("%s; the config file still says otherwise: a reload from it reverts the promotion", message)
        return message

    def status(self) -> dict[str, Any]:
        """Everything ``/status`` shows, JSON-ready."""
        assert self.table is not None
        ready, _ = self.readiness()
        route_readiness = {route.name: route.readiness() for route in self.table.routes}
        fallbacks = _counter_values(self.metrics.fallbacks, ("route", "to"))
        reloads = _counter_values(self.metrics.config_reloads, ("result",))
        by_upstream: dict[str, dict[str, int]] = {}
        for stats in self.metrics.routes.values():
            for (upstream, _role, code), n in stats.attempts.items():
                counts = by_upstream.setdefault(upstream, {})
                counts[code] = counts.get(code, 0) + n
        config = self.table.config
        return {
            "version": __version__,
            "config": config.source,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": ready,
            "draining": self.draining,
            "inflight_calls": self.inflight_calls(),
            "tasks": self.tasks(),
            "listen": {"grpc": self.listen_address, "port": self.grpc_port, "admin": self.admin_address},
            "routes": [
                {
                    "name": route.name,
                    "match": {"method": route.spec.match.method, "model": route.spec.match.model},
                    "primary": route.spec.primary,
                    "fallback": list(route.spec.fallback),
                    "static_default": route.static is not None,
                    "ready": route_readiness[route.name][0],
                    "detail": route_readiness[route.name][1],
                    "calls": dict(sorted(route.metrics.answers.items())),
                    "fallbacks": {to: int(n) for (name, to), n in sorted(fallbacks.items()) if name == route.name},
                    "shadows": shadow_status(route.mirror) if route.mirror is not None else [],
                    "drift": drift_status(self._drift[route.name]) if route.name in self._drift else None,
                    "capture": self._captures[route.name].snapshot() if route.name in self._captures else None,
                }
                for route in self.table.routes
            ],
            "upstreams": {
                name: {**target.snapshot(), "requests": dict(sorted(by_upstream.get(name, {}).items()))}
                for name, target in self.table.targets.items()
            },
            "config_reloads": {result: int(n) for (result,), n in reloads.items()},
            "event_loop": {
                "lag_seconds": round(self.lag.lag, 6),
                "max_lag_seconds": round(self.lag.max_lag, 6),
                "shedding_mirrors": self.lag.overloaded,
            },
            "promotions": self.promotions,
        }


def watched(route: Route) -> bool:
    """Whether anything observes ``route``'s answered calls beyond its metrics (shadows, drift, capture)."""
    return bool(route.shadows) or route.drift is not None or route.capture is not None


def _load_profile(route: str, spec: Drift) -> Reference | None:
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


def _make_capture_dirs(config: Config) -> None:
    """Create the routes' capture directories; one that cannot be created refuses the start (or the reload)."""
    for route in config.routes:
        if route.capture is not None:
            try:
                Path(route.capture.path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StartError(
                    f"route {route.name}: cannot create capture directory {route.capture.path}: {exc.strerror or exc}"
                ) from None


def _counter_values(counter: Counter, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Sum a prometheus-client counter's ``_total`` samples by the given labels."""
    totals: dict[tuple[str, ...], float] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = tuple(sample.labels[name] for name in labels)
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def admin_token(config: Config) -> str | None:
    """The admin bearer token, read from ``admin_token_file`` at start; None: the endpoint is open (loopback)."""
    return Path(config.admin_token_file).read_text(encoding="utf-8").strip() if config.admin_token_file else None


def _server_credentials(config: Config) -> grpc.ServerCredentials:
    assert config.tls is not None
    pair = (Path(config.tls.key).read_bytes(), Path(config.tls.cert).read_bytes())
    client_ca = Path(config.tls.client_ca).read_bytes() if config.tls.client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)

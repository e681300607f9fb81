"""The running proxy: listener, admin endpoint, health checks, reload and graceful stop.

Lifecycle: ``start()`` builds the first route table with its per-route parts (proxy/observing/parts.py), binds the
gRPC listener (proxy/runtime/listener.py) and the admin endpoint (proxy/admin/endpoints.py), and starts one
health-check loop per upstream (proxy/runtime/upstreams.py). ``reload(config)`` swaps in a new route table; calls
already running finish on the old one, and upstreams only the old one used are closed once it has drained.
``stop(grace)`` stops in the order load balancers expect: report not-ready (``/readyz`` 503, grpc health
NOT_SERVING) while still serving for ``shutdown_delay``, then stop accepting (new calls get UNAVAILABLE, never
CANCELLED: proxy/runtime/shutdown.py) and drain in-flight calls for up to ``grace`` seconds, then
stop health checks, the parts, upstream channels and the admin endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import health, health_pb2
from mlmirror import __version__
from mlmirror.admin.dashboard import admin_server, agreement_thresholds
from mlmirror.admin.endpoints import outcomes_answer
from mlmirror.admin.http import AdminServer, Request, Response
from mlmirror.config import Config, load_config
from mlmirror.errors import ConfigError, StartError
from mlmirror.eventloop import loop_name
from mlmirror.handoff.tap import Observer, Tap
from mlmirror.looplag import LoopLag
from mlmirror.metrics import Metrics
from mlmirror.observing.envoytap import EnvoyTapReader
from mlmirror.observing.exposure import observer_warnings
from mlmirror.observing.groundtruth.access import FeedbackEntrances
from mlmirror.observing.groundtruth.feedback import FeedbackRelay, FeedbackService
from mlmirror.observing.groundtruth.park import OutcomePark, ParkCollector
from mlmirror.observing.kinds import PART_KINDS
from mlmirror.observing.parts import PartContext, PartKind, RouteParts
from mlmirror.observing.shadows.headers import HandoffFilter
from mlmirror.observing.shadows.promotion import PromotionError
from mlmirror.protocol.names import INFERENCE_SERVICE
from mlmirror.runtime.listener import Listener, ext_proc_observer, start_listener
from mlmirror.runtime.promotion import promote
from mlmirror.runtime.role import ALONE, Role
from mlmirror.runtime.shutdown import Door, serve_out
from mlmirror.runtime.signals import serve_until_stopped
from mlmirror.runtime.status import proxy_status, readiness
from mlmirror.runtime.upstreams import UpstreamPool
from mlmirror.serving.handler import ProxyHandler, TableSource
from mlmirror.serving.sampling import RequestIds
from mlmirror.serving.table import RouteTable
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["Proxy", "admin_token"]

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
        kinds: Sequence[PartKind] = PART_KINDS,
    ) -> None:
        """``observers``: fed every answered call of every route; ``kinds``: the per-route parts routes may have
        (the registry's, by default)."""
        self.role = role
        self.metrics = metrics if metrics is not None else Metrics()
        self.tap = Tap(observers, self.metrics.observer_errors)
        self.ids = RequestIds()
        self.lag = LoopLag(config.mirror_shed_lag)
        #: per-route consumers; a worker has none (its watched calls go to the hub)
        self.parts = RouteParts(
            kinds, PartContext(self.lag, serving=not role.hub, wait_for_serving=role.wait_for_serving)
        )
        self.feedback = FeedbackService(
            lambda: [p.engine.ground_truth for p in self.parts.of_kind("drift") if p.engine.ground_truth is not None],
            lambda: [p.writer for p in self.parts.of_kind("capture")],  # captured calls get their outcomes appended
            OutcomePark(config.feedback.early_max, config.feedback.early_ttl),  # outcomes before their prediction
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
        self._door = Door(self._handler)  # closed by stop(): then new calls are refused, UNAVAILABLE
        self._health = health.aio.HealthServicer()
        self._upstreams = UpstreamPool(self.metrics, config.max_message_size, self._refresh_serving_status)
        self._background: set[asyncio.Task[None]] = set()
        self._server: grpc.aio.Server | None = None
        self.envoy_tap: EnvoyTapReader | None = None  # observer mode reading Envoy's tap filter
        self._admin: AdminServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.draining = False
        self.started_at = 0.0
        self.grpc_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics.inflight_calls.set_function(self.inflight_calls)
        self.metrics.event_loop_lag.set_function(lambda: self.lag.lag)
        self.metrics.mirror_shedding.set_function(lambda: 1 if self.lag.overloaded else 0)
        self.metrics.process_tasks.set_function(self.tasks)
        for collector in self.parts.collectors():
            self.metrics.registry.register(collector)
        if not role.worker:  # a worker relays Feedback to the hub, which parks
            self.metrics.registry.register(ParkCollector(self.feedback.park))

    # --- start ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving. Raises ``StartError`` (after releasing what it had started) when the listener or
        the admin endpoint cannot bind, a TLS file cannot be read, or a part refuses the config."""
        config = self._first_config
        self._loop = asyncio.get_running_loop()
        self._install_table(self._build_table(config, {}))
        self.lag.start()
        try:
            self._server, self.grpc_port = await start_listener(
                config, self.listen_address, self._listener(config), reuse_port=self.role.worker,
                tls=not self.role.hub,
            )  # fmt: skip
            try:
                await self._entrances.start((self._feedback_relay or self.feedback).handler, shared=self.role.worker)
            except OSError as exc:
                raise StartError(f"cannot serve feedback.listen: {exc}") from None
            admin = self.admin_address
            if admin is not None:
                limits = None if self.role.worker else lambda: agreement_thresholds(self.table and self.table.config)
                self._admin = admin_server(admin, self, PromotionError, token=admin_token(config), thresholds=limits)
                try:
                    await self._admin.start()
                except OSError as exc:
                    self._admin = None
                    raise StartError(f"cannot serve the admin endpoint on {admin}: {exc.strerror or exc}") from None
            await self._check_parts()
            self._read_envoy_tap(config)
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

    def _listener(self, config: Config) -> Listener:
        feedback = (self._feedback_relay or self.feedback).handler(self._entrances.listener)
        if self.role.hub:
            return Listener(feedback, self._health)
        if config.mode == "observer":
            return Listener(
                feedback, self._health, ext_proc=ext_proc_observer(cast(TableSource, self), self.metrics, config)
            )
        return Listener(feedback, self._health, relay=self._door)

    def _read_envoy_tap(self, config: Config) -> None:
        """Observer mode with ``envoy_tap``: read the calls Envoy taps, until the stop (proxy/observing/envoytap.py)."""
        if config.mode != "observer" or config.envoy_tap is None or self.role.worker:
            return  # the observing process reads it (or the lone process); the workers only serve ext_proc
        m = self.metrics
        self.envoy_tap = EnvoyTapReader(cast(TableSource, self), config.envoy_tap, config.max_message_size,
                                        m.envoy_tap_traces, m.envoy_tap_sessions)  # fmt: skip
        reader = self.envoy_tap
        m.envoy_tap_attached.set_function(lambda: 1 if reader.attached else 0)
        self._spawn(reader.run())

    async def _check_parts(self) -> None:
        """Let each part refuse the start once the upstreams can be asked (say, a drift profile that does not fit
        the inputs the route's model declares)."""
        assert self.table is not None
        for route in self.table.routes:
            for part in self.parts.of_route(route.name):
                await part.check(route.chain[0])

    @property
    def listen_address(self) -> str:
        return self.role.listen or self._first_config.listen

    @property
    def admin_address(self) -> str | None:
        """The admin endpoint's address: the config's, a worker's internal one, none for the hub."""
        if self.role.kind == "alone":
            return self._first_config.admin
        return self.role.admin

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin is not None else None

    def inflight_calls(self) -> int:
        """Client calls being served, on the current route table and on retired ones still draining."""
        return sum(table.inflight for table in self._live_tables)

    def tasks(self) -> int:
        """asyncio tasks not yet done on the event loop the proxy started on (0 before ``start``)."""
        return len(asyncio.all_tasks(self._loop)) if self._loop is not None else 0

    def _build_table(self, config: Config, current: dict[str, UpstreamTarget]) -> RouteTable:
        """A route table for ``config``, with its parts rebuilt (kept where unchanged). Raises ``StartError`` with
        nothing changed when a part refuses the config."""
        targets = self._upstreams.targets_for(config, current)
        new = [target for target in targets.values() if target not in current.values()]
        observers: dict[str, Sequence[Observer]]
        if self.role.worker:  # shadows, drift and captures live in the hub: watched routes' calls go there
            assert self.role.handoff is not None
            # sampled at the door first, then only the metadata some shadow carries (HandoffFilter)
            observers = {
                route.name: (HandoffFilter(self.role.handoff.door(route), route),)
                for route in config.routes
                if any(kind.configured(route) for kind in self.parts.kinds)
            }
        else:
            try:
                self.parts.rebuild(config.routes, targets)
            except BaseException:
                for target in new:
                    self._spawn(target.close())
                raise
            observers = {route.name: self.parts.of_route(route.name) for route in config.routes}
        self._upstreams.watch(new)
        return RouteTable(config, targets, self.metrics, self.tap, self.ids, observers)

    def _install_table(self, table: RouteTable) -> None:
        self.table = table
        self._live_tables.add(table)
        self._handler.invalidate()
        self.feedback.attach()  # the new table's ground-truth stores join early outcomes too

    # --- health and readiness ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, reason per route): see ``status.readiness``."""
        return readiness(self, self._first_config.mode)  # the mode a restart would change, not a reload

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
        """Serve new calls with ``config``. Listener, admin, TLS, size and ``envoy_tap`` settings need a restart;
        changes to them are logged and ignored."""
        old = self.table
        assert old is not None
        for setting in ("mode", "listen", "admin", "tls", "max_message_size", "feedback", "envoy_tap"):
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
        await self._upstreams.release(removed)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- promotion --------------------------------------------------------------------------------------------

    async def promote(self, route: str, shadow: str, *, force: bool = False) -> str:
        """Make ``shadow`` the primary of ``route`` (proxy/runtime/promotion.py). Raises ``PromotionError``;
        returns what was done, in words."""
        message = await promote(self, route, shadow, force=force)
        self.promotions.append({"time": time.time(), "route": route, "shadow": shadow, "detail": message})
        return message

    # --- stop -------------------------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Report not-ready and serve on for ``delay`` seconds, then stop accepting calls, let in-flight ones finish
        for up to ``grace`` seconds, then release everything. Without ``grace``, both come from the config
        (``shutdown_delay``, ``shutdown_grace``); with it, ``delay`` defaults to 0. The hub waits no delay: no load
        balancer sends to it."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.draining = True
        assert self.table is not None
        config = self.table.config
        if delay is None:
            delay = config.shutdown_delay if grace is None and not self.role.hub else 0.0
        grace = config.shutdown_grace if grace is None else grace
        self.metrics.ready.set(0)
        await self._health.enter_graceful_shutdown()
        await serve_out(self._server, self._door, delay=delay, grace=grace, inflight=self.inflight_calls)
        current = asyncio.current_task()  # stop() may itself run as a background task (signal handler)
        tasks = [task for task in (*self._upstreams.loops(), *self._background) if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                log.warning("stopping: %d background tasks did not finish within 5s", len(stuck))
        await self.parts.stop()
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
        await serve_until_stopped(
            self._stopped, stop=lambda: self._spawn(self.stop()), reload=lambda: self._spawn(self.reload_from_file())
        )

    # --- what the admin endpoints ask (proxy/admin/endpoints.py) -----------------------------------------------

    async def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

    async def ready_report(self) -> tuple[bool, list[str]]:
        ready, reasons = self.readiness()
        return ready, [f"{name}: {reason}" for name, reason in reasons.items()]

    async def status_report(self) -> dict[str, object]:
        return self.status()

    async def reload_report(self) -> tuple[bool, str]:
        if await self.reload_from_file():
            return True, "reloaded"
        return False, "reload rejected; the current config stays (see the proxy's log)"

    async def outcomes(self, request: Request) -> Response:
        """Ground truth reported through ``POST /outcomes`` (with the admin or the feedback token): the counts by
        result."""
        refused = self._entrances.refuse_http(request.headers)
        if refused is not None:
            return Response.text(refused[1], refused[0])
        return outcomes_answer(request.body, self.feedback.report)

    def status(self) -> dict[str, Any]:
        """Everything ``/status`` shows, JSON-ready."""
        return proxy_status(self)


def admin_token(config: Config) -> str | None:
    """The admin bearer token, read from ``admin_token_file`` at start; None: the endpoint is open (loopback)."""
    return Path(config.admin_token_file).read_text(encoding="utf-8").strip() if config.admin_token_file else None

"""The observing process of ``mlmirror serve``: shadows, drift, ground truth and capture, apart from serving.

Started by the supervisor (proxy/runtime/supervisor.py), it runs at a lower CPU priority (``observer.nice``) a
``Proxy`` in the hub role (proxy/runtime/role.py): the serving workers hand it their answered calls over a Unix socket
(proxy/handoff/transport.py) and relay Feedback calls to its listener (a Unix socket too); it makes the shadow copies,
compares them, measures drift and joins ground truth. Its admin endpoint is internal (loopback, any free port), for
the supervisor, which merges it with the workers'. It stops on SIGTERM (the supervisor stops it after the workers
have drained) or when the supervisor goes away (its lifeline closes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mlmirror.config import Config
from mlmirror.errors import StartError
from mlmirror.handoff.tap import CallRecord
from mlmirror.handoff.transport import HandoffReceiver
from mlmirror.metrics import Metrics
from mlmirror.observing.pressure import CpuBudget, CpuPressure, SampledRate
from mlmirror.observing.servinggate import GateCollector, ServingGate
from mlmirror.runtime.children import announce, child_parser, run_child, serve_child
from mlmirror.runtime.promotion import replayed_config
from mlmirror.runtime.proxy import Proxy
from mlmirror.runtime.role import Role
from mlmirror.serving.table import RouteRuntime, RouteTable
from prometheus_client import Counter

__all__ = ["FEEDBACK_SOCKET", "HANDOFF_SOCKET", "main", "run_observer"]

log = logging.getLogger(__name__)

HANDOFF_SOCKET = "handoff.sock"
FEEDBACK_SOCKET = "feedback.sock"


#: why the observing process sheds what it is handed -> the ``observer`` key that sets the limit
SHED_LIMITS = {"cpu_pressure": "cpu_pressure_limit", "cpu_limit": "cpu_limit"}


class Deliveries:
    """Hands each received call to its route's observers in the hub's current route table (never raises: the tap
    counts observer errors). Calls of a route the hub no longer has are counted ``unrouted``; calls that arrive while
    a meter sheds (``meters``, by reason: the CPU under pressure, ``observer.cpu_pressure_limit``; this process over
    its CPU budget, ``observer.cpu_limit``) are dropped and counted in ``shed`` by that reason."""

    def __init__(
        self,
        hub_table: object,
        unrouted: Counter,
        meters: dict[str, SampledRate],
        shed: Counter,
        gate: ServingGate | None = None,
    ) -> None:
        """``gate``: the wait while serving is busy, whose threshold follows the table's config (a reload)."""
        self._hub = hub_table
        self._gate = gate
        self._unrouted = unrouted
        self._meters = meters
        self._counters = {reason: shed.labels(reason) for reason in meters}
        self.shed = dict.fromkeys(meters, 0)
        self._cached: tuple[RouteTable | None, dict[str, RouteRuntime]] = (None, {})

    def __call__(self, record: CallRecord) -> None:
        table = self._hub.table  # type: ignore[attr-defined]
        cached, routes = self._cached
        if cached is not table:
            routes = {route.name: route for route in table.routes} if table is not None else {}
            self._cached = (table, routes)
            if table is not None:  # a reload may change the limits
                for reason, meter in self._meters.items():
                    meter.limit = getattr(table.config.observer, SHED_LIMITS[reason])
                if self._gate is not None:
                    self._gate.threshold = table.config.observer.serving_idle
        for reason, meter in self._meters.items():
            if meter.shedding:
                self.shed[reason] += 1
                self._counters[reason].inc()
                return
        route = routes.get(record.route)
        if route is not None and route.tap:
            route.tap.offer(record)
        else:
            self._unrouted.inc()


AUTOGROUP = Path("/proc/self/autogroup")
TASKS = Path("/proc/self/task")


def _lower_priority(config: Config, autogroup: Path = AUTOGROUP, tasks: Path = TASKS) -> None:
    """Serving first: raise this process's niceness by ``observer.nice`` and, with ``observer.scheduling: idle``,
    move its threads to ``SCHED_IDLE`` (they run only when a CPU has nothing else to run; those started later
    inherit it).

    Where Linux groups processes by session for scheduling (``kernel.sched_autogroup_enabled``), a niceness only
    ranks a process within its own session's group, and every child of the supervisor has a session of its own: the
    group's niceness must be raised too (``/proc/self/autogroup``; 19 with ``idle``), or the observer competes with
    the workers as an equal."""
    nice = config.observer.nice
    idle = config.observer.scheduling == "idle"
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("observer: cannot lower its CPU priority by %d: %s", nice, exc)
    if idle:
        for task in sorted(tasks.iterdir()) if tasks.exists() else [Path("0")]:
            try:
                os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:  # a thread that ended meanwhile; or no SCHED_IDLE here: the niceness stays
                log.debug("observer: thread %s stays at its policy: %s", task.name, exc)
    group = 19 if idle else nice
    if group and autogroup.exists():
        try:
            autogroup.write_text(f"{group}\n")
        except OSError as exc:
            log.warning("observer: cannot lower its scheduling group's priority to nice %d: %s", group, exc)


async def run_observer(
    config_path: str, folder: Path, hello_fd: int, lifeline_fd: int, promotions: Sequence[Sequence[str]] = ()
) -> None:
    """Serve as the observing process until SIGTERM or until the supervisor goes away. ``promotions``: made since
    the config file was read (``--promote``)."""
    config = replayed_config(config_path, promotions)
    _lower_priority(config)
    metrics = Metrics()
    received = Counter(
        "mlmirror_handoff_received", "Answered calls the observing process received from each worker.", ["worker"],
        registry=metrics.registry,
    )  # fmt: skip
    unrouted = Counter(
        "mlmirror_handoff_unrouted",
        "Received calls whose route the observing process does not have (a reload in between).",
        registry=metrics.registry,
    )
    shed = Counter(
        "mlmirror_handoff_shed", "Calls the observing process received but did not observe, by reason.", ["reason"],
        registry=metrics.registry,
    )  # fmt: skip
    gate = ServingGate(config.observer.serving_idle)
    metrics.registry.register(GateCollector(gate))
    pressure = CpuPressure(config.observer.cpu_pressure_limit)
    budget = CpuBudget(config.observer.cpu_limit)
    meters: dict[str, SampledRate] = {"cpu_pressure": pressure, "cpu_limit": budget}
    deliveries: Deliveries | None = None

    def intake() -> dict[str, object]:
        shed = deliveries.shed if deliveries else dict.fromkeys(meters, 0)
        return {"shed": dict(shed), "cpu_pressure": pressure.snapshot(), "cpu_limit": budget.snapshot(),
                "serving_idle": gate.snapshot()}  # fmt: skip

    role = Role("hub", listen=f"unix:{folder / FEEDBACK_SOCKET}", admin="127.0.0.1:0", intake=intake,
                wait_for_serving=gate.wait_sync)  # fmt: skip
    hub = Proxy(config, metrics=metrics, role=role)
    await hub.start()
    deliveries = Deliveries(hub, unrouted, meters, shed, gate)
    pressure.start()
    budget.start()
    gate.start()
    socket = folder / HANDOFF_SOCKET
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()  # a previous observer's, if it was killed
    malformed = Counter(
        "mlmirror_handoff_malformed", "Damaged hand-off frames the observing process read, by worker.", ["worker"],
        registry=metrics.registry,
    )  # fmt: skip

    def greeted(hello: dict) -> None:
        if isinstance(hello.get("pid"), int):
            gate.watch(hello["pid"])

    receiver = HandoffReceiver(socket, deliveries, greeted, received, malformed, before_read=gate.wait)
    try:
        await receiver.start()
    except OSError as exc:
        await hub.stop(grace=0)
        raise StartError(f"cannot listen for the hand-off on {socket}: {exc}") from None
    announce(hello_fd, pid=os.getpid(), admin_port=hub.admin_port)

    async def cleanup() -> None:
        pressure.stop()
        budget.stop()
        await gate.stop()
        await receiver.close()

    await serve_child("observer", hub.run_until_signalled, lambda: hub.stop(grace=0), lifeline_fd, folder, cleanup)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the observing process (started by the supervisor, not by hand)."""
    args = child_parser("mlmirror.runtime.observer_process", "mlmirror's observing process").parse_args(argv)
    return run_child("observer", args, run_observer(args.config, args.folder, args.hello_fd, args.lifeline_fd,
                                                    args.promote))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

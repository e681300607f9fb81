"""The chaos scenarios: each runs a no-fault baseline phase, then the same load with a fault injected, and returns
what the clients saw and what the proxy counted.

Every scenario but SIGTERM runs the proxy in this process (it is a ``Proxy`` object, started and stopped here);
the model servers that must die run in their own processes. The route is ``iris`` (model ``iris``), primary
``production`` with the demo ``baseline`` model as fallback, the demo ``candidate`` as a shadow at 100%. Circuits
eject for 200 ms (at most 1 s) and health checks run every 100 ms, so that recovery fits in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from mlmirror.config import parse_config
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.runtime.proxy import Proxy

from ..ports import free_port, wait_for_port
from .load import Outcome, drive, p99_ms
from .metrics import Copies, Scrape, scrape
from .servers import REPO, FaultyModel, ModelProcess, serve_faulty

__all__ = ["SCENARIOS", "Result", "config_yaml"]

UPSTREAM = (
    "timeout: 1s, circuit: {failures: 5, ejection: 200ms, max_ejection: 1s}, "
    "health_check: {interval: 100ms, timeout: 100ms}"
)
#: calls sent before the baseline phase and not counted in it
WARMUP = 100
SHADOW = "percent: 100, timeout: 300ms, max_inflight: 32, queue_size: 256"


@dataclass
class Result:
    """One scenario's figures. ``baseline`` and ``fault`` are the two phases' client outcomes; ``scrape`` is the
    proxy's /metrics at the end (after copies settled); ``facts`` holds scenario-specific observations."""

    scenario: str
    baseline: list[Outcome]
    fault: list[Outcome]
    scrape: Scrape | None
    explanation: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return len(self.baseline) + len(self.fault)

    @property
    def errors(self) -> Counter:
        """Client calls that did not end OK, by status."""
        return Counter(o.code for o in (*self.baseline, *self.fault) if o.code != "OK")

    @property
    def served_by(self) -> Counter:
        """Who answered the fault phase's calls."""
        return Counter(o.served_by for o in self.fault if o.code == "OK")

    def drops(self) -> dict[str, float]:
        """Dropped copies by ``shadow:reason`` (non-zero only)."""
        if self.scrape is None:
            return {}
        return {f"{s}:{r}": n for s, c in self.scrape.copies.items() for r, n in c.dropped.items() if n}


def config_yaml(
    primary: int,
    *,
    fallback: int | None = None,
    shadows: dict[str, int] | None = None,
    drift: bool = False,
    listen: str = "127.0.0.1:0",
    admin: str = "127.0.0.1:0",
) -> str:
    """The proxy configuration of the scenarios (ports on 127.0.0.1)."""
    shadows = shadows or {}
    upstreams = {"production": primary, **({"baseline": fallback} if fallback else {}), **shadows}
    lines = [f"listen: {listen}", f"admin: {admin}", "shutdown_grace: 5s", "upstreams:"]
    lines += [f"  {name}: {{address: 127.0.0.1:{port}, {UPSTREAM}}}" for name, port in upstreams.items()]
    lines += ["routes:", "  - name: iris", "    match: {model: iris}", "    primary: production"]
    if fallback:
        lines.append("    fallback: [baseline]")
    if shadows:
        lines.append("    shadows:")
        lines += [f"      - {{upstream: {name}, {SHADOW}}}" for name in shadows]
    if drift:
        lines.append("    drift: {window: 100, capture: 100}")
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def _proxy(text: str) -> AsyncIterator[tuple[Proxy, grpc.aio.Channel]]:
    proxy = Proxy(parse_config(text, "<chaos>"))
    await proxy.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            yield proxy, channel
    finally:
        await proxy.stop(grace=0)


async def _settled(admin_port: int, within: float = 10.0) -> Scrape:
    """/metrics once no copy is pending any more (or after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        figures = await scrape(admin_port)
        if all(c.pending == 0 for c in figures.copies.values()) or time.monotonic() > deadline:
            return figures
        await asyncio.sleep(0.05)


async def _phases(
    channel: grpc.aio.Channel,
    calls: int,
    rate: float,
    inject: Callable[[], Awaitable[None]],
    during: Callable[[float], Awaitable[None]] | None = None,
) -> tuple[list[Outcome], list[Outcome]]:
    """``WARMUP`` calls (not kept: connections, first-call compilation), ``calls // 2`` calls without a fault,
    ``inject()``, then the rest while ``during(seconds of the phase)`` runs alongside."""
    await drive(channel, WARMUP, rate)
    baseline = await drive(channel, calls // 2, rate)
    await inject()
    n = calls - calls // 2
    load = drive(channel, n, rate)
    if during is None:
        return baseline, await load
    fault, _ = await asyncio.gather(load, during(n / rate))
    return baseline, fault


async def _served_by(channel: grpc.aio.Channel, upstream: str, rate: float, within: float = 15.0) -> float:
    """Keep calling until ``upstream`` answers one; when (``time.perf_counter``) it first did, or inf."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for outcome in await drive(channel, 10, rate):
            if outcome.served_by == upstream:
                return outcome.started + outcome.latency
    return math.inf


async def _nothing() -> None:
    return None


def _copy_note(figures: Scrape) -> str:
    parts = []
    for shadow, copies in figures.copies.items():
        finished = ", ".join(f"{k} {v:.0f}" for k, v in sorted(copies.finished.items()) if v) or "none"
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(copies.dropped.items()) if v) or "none"
        parts.append(f"{shadow}: finished {finished}; dropped {dropped}")
    return "; ".join(parts)


# --- a. the primary SIGKILLed and restarted ---------------------------------------------------------------------


async def primary_killed(calls: int, rate: float) -> Result:
    async with (
        ModelProcess("production") as primary,
        serve_faulty("baseline") as (_, fallback),
        serve_faulty("candidate") as (_, candidate),
    ):
        text = config_yaml(primary.port, fallback=fallback, shadows={"candidate": candidate})
        async with _proxy(text) as (proxy, channel):
            up = [0.0]

            async def restart(seconds: float) -> None:
                await asyncio.sleep(seconds * 0.2)
                await primary.start()  # a new process: imports, binds (about a second of downtime in all)
                up[0] = time.perf_counter()

            baseline, fault = await _phases(channel, calls, rate, primary.kill, restart)
            recovered = await _served_by(channel, "production", rate) - up[0]
            figures = await _settled(proxy.admin_port or 0)
    fallbacks = {f"{to}/{reason}": n for (_, to, reason), n in figures.fallbacks.items() if n}
    return Result(
        "primary SIGKILLed, restarted at once",
        baseline,
        fault,
        figures,
        "calls in flight on the dead connection failed UNAVAILABLE and moved to the fallback; after 5 failures the "
        f"circuit opened and calls went straight to it (fallbacks {fallbacks}); {recovered:.2f} s after the "
        f"restarted primary listened again a half-open probe had closed the circuit and production served again. "
        f"Shadow copies are unaffected. {_copy_note(figures)}",
        {"recovered": recovered},
    )


# --- b. the primary slow, the primary failing -----------------------------------------------------------------


async def _primary_fault(
    calls: int, rate: float, fault: Callable[[FaultyModel], None]
) -> tuple[list[Outcome], list[Outcome], Scrape]:
    """The in-process primary (with a fallback and a shadow) under load; ``fault(primary)`` between the phases."""
    async with (
        serve_faulty("production") as (primary, primary_port),
        serve_faulty("baseline") as (_, fallback),
        serve_faulty("candidate") as (_, candidate),
    ):
        text = config_yaml(primary_port, fallback=fallback, shadows={"candidate": candidate})
        async with _proxy(text) as (proxy, channel):

            async def inject() -> None:
                fault(primary)

            baseline, faulted = await _phases(channel, calls, rate, inject)
            return baseline, faulted, await _settled(proxy.admin_port or 0)


async def primary_slow(calls: int, rate: float, delay: float = 0.05) -> Result:
    baseline, fault, figures = await _primary_fault(calls, rate, lambda primary: setattr(primary, "delay", delay))
    return Result(
        f"primary slow (+{delay * 1e3:.0f} ms per call)",
        baseline,
        fault,
        figures,
        f"every call waits the injected {delay * 1e3:.0f} ms, well inside the 1 s upstream timeout: no fallback, "
        f"p99 grows by about the delay. {_copy_note(figures)}",
    )


async def primary_failing(calls: int, rate: float) -> Result:
    baseline, fault, figures = await _primary_fault(
        calls, rate, lambda primary: setattr(primary, "fail_with", grpc.StatusCode.UNAVAILABLE)
    )
    fallbacks = {f"{to}/{reason}": n for (_, to, reason), n in figures.fallbacks.items() if n}
    return Result(
        "primary answers UNAVAILABLE",
        baseline,
        fault,
        figures,
        f"UNAVAILABLE is in fallback_on: each failed call moved to the fallback; the circuit opened after 5 and "
        f"half-open probes kept failing (fallbacks {fallbacks}). Copies of fallback answers are sent but not "
        f"compared (no production answer). {_copy_note(figures)}",
    )


# --- c. a shadow hung, a shadow killed ------------------------------------------------------------------------


async def shadow_hung(calls: int, rate: float) -> Result:
    async with serve_faulty("production") as (_, primary_port), serve_faulty("candidate") as (shadow, shadow_port):
        text = config_yaml(primary_port, shadows={"candidate": shadow_port})
        async with _proxy(text) as (proxy, channel):

            async def hang() -> None:
                shadow.delay = 3600.0  # accepts every copy and never answers it

            baseline, fault = await _phases(channel, calls, rate, hang)
            figures = await _settled(proxy.admin_port or 0)
    return Result(
        "shadow hung (accepts copies, never answers)",
        baseline,
        fault,
        figures,
        "each copy ends at its 300 ms timeout (DEADLINE_EXCEEDED); after 5 the shadow's circuit opens and copies "
        "are dropped at once (circuit_open) but for one half-open probe per ejection; production never waits for "
        f"a copy. {_copy_note(figures)}",
    )


async def shadow_killed(calls: int, rate: float) -> Result:
    async with serve_faulty("production") as (_, primary_port), ModelProcess("candidate") as shadow:
        text = config_yaml(primary_port, shadows={"candidate": shadow.port})
        async with _proxy(text) as (proxy, channel):
            baseline, fault = await _phases(channel, calls, rate, shadow.kill)
            figures = await _settled(proxy.admin_port or 0)
    return Result(
        "shadow SIGKILLed",
        baseline,
        fault,
        figures,
        "copies in flight and the next few fail UNAVAILABLE; after 5 the shadow's circuit opens and copies are "
        f"dropped (circuit_open); production is untouched. {_copy_note(figures)}",
    )


# --- d. the drift engine raising --------------------------------------------------------------------------------


async def drift_raising(calls: int, rate: float) -> Result:
    """Fault injection by monkeypatching the real engine: its ``offer`` (on the event loop, called by the tap)
    raises on every other call, and its worker's ``_process`` raises on every batch; both are restored at the end
    of the fault phase, after which the engine must count calls again."""
    async with serve_faulty("production") as (_, primary_port), serve_faulty("candidate") as (_, candidate):
        text = config_yaml(primary_port, shadows={"candidate": candidate}, drift=True)
        async with _proxy(text) as (proxy, channel):
            engine: DriftEngine = proxy.parts.get("iris", "drift").engine
            real_offer = engine.offer
            offers = [0]

            def offer(record) -> None:
                offers[0] += 1
                if offers[0] % 2:
                    raise RuntimeError("injected: drift engine offer")
                real_offer(record)

            def process(batch) -> None:
                raise RuntimeError("injected: drift engine worker")

            async def inject() -> None:
                engine.offer = offer  # type: ignore[method-assign]  # the fault: this engine's methods replaced
                engine._process = process  # type: ignore[method-assign]

            baseline, fault = await _phases(channel, calls, rate, inject)
            del engine.offer, engine._process  # the class's methods again
            before = engine.accepted
            after = await drive(channel, 200, rate)
            await asyncio.sleep(0.2)  # the worker polls every 20 ms
            counted_after = engine.accepted - before
            alive = engine._thread is not None and engine._thread.is_alive()
            figures = await _settled(proxy.admin_port or 0)
    raised = figures.observer_errors.get("drift:iris", 0.0)
    lost = figures.drift.get("mlmirror_drift_decode_errors_total{internal}", 0.0)
    return Result(
        "drift engine raising (offer and worker)",
        baseline,
        [*fault, *after],
        figures,
        f"the tap counted {raised:.0f} raising offers (mlmirror_observer_errors_total) and answered every call; the "
        f"worker lost {lost:.0f} calls in raising batches (decode errors 'internal') and kept running; restored, "
        f"the engine counted {counted_after} of the next {len(after)} calls. {_copy_note(figures)}",
        {"offers": offers[0], "raised": raised, "lost": lost, "counted_after": counted_after, "alive": alive},
    )


# --- e. ten reloads under load -------------------------------------------------------------------------------------


async def reloads(calls: int, rate: float, count: int = 10) -> Result:
    """Ten reloads alternating between two configs: A (fallback baseline; shadow candidate) and B (no fallback;
    shadows candidate and control, a second production). The candidate's settings never change, so its mirror and
    counters are kept; control's mirror is created and closed five times."""
    async with (
        serve_faulty("production") as (_, primary_port),
        serve_faulty("baseline") as (_, fallback),
        serve_faulty("candidate") as (_, candidate),
        serve_faulty("production") as (_, control),
    ):
        a = config_yaml(primary_port, fallback=fallback, shadows={"candidate": candidate})
        b = config_yaml(primary_port, shadows={"candidate": candidate, "control": control})
        async with _proxy(a) as (proxy, channel):
            controls = []

            async def reload_ten(seconds: float) -> None:
                for i in range(count):
                    await asyncio.sleep(seconds / (count + 1))
                    await proxy.reload(parse_config(b if i % 2 == 0 else a, "<chaos>"))
                    part = proxy.parts.get("iris", "shadows")
                    mirror = next((s for s in part.mirror.shadows if s.name == "control"), None) if part else None
                    if mirror is not None:
                        controls.append(mirror)

            baseline, fault = await _phases(channel, calls, rate, _nothing, reload_ten)
            figures = await _settled(proxy.admin_port or 0)
            leftover = sum(m.inflight + m.queued for m in controls)
            control_copies = [
                sum(m.stats.results.values()) + sum(m.stats.drops.values()) for m in controls
            ]  # fmt: skip
            successes = proxy.metrics.registry.get_sample_value("mlmirror_config_reloads_total", {"result": "success"})
    return Result(
        f"{count} config reloads (shadows and fallbacks change)",
        baseline,
        fault,
        figures,
        f"{successes:.0f} reloads; calls in flight finish on the table they started on; the candidate mirror is "
        f"kept across reloads (its counters cover every call); each of the {len(controls)} control mirrors ended "
        f"with nothing pending (copies cancelled at close count as CANCELLED). {_copy_note(figures)}",
        {
            "reloads": successes,
            "controls": len(controls),
            "control_leftover": leftover,
            "control_copies": control_copies,
        },
    )


# --- f. SIGTERM to a proxy process under load -----------------------------------------------------------------------


async def sigterm(calls: int, rate: float, delay: float = 0.1) -> Result:
    """The proxy in its own process (``mlmirror serve``), the primary slowed by ``delay`` seconds so that calls are
    in flight; SIGTERM 30% into the fault phase. No fallback can help here: the proxy itself goes away."""
    async with serve_faulty("production") as (primary, primary_port):
        listen, admin = free_port(), free_port()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mlmirror.yaml"
            text = config_yaml(primary_port, listen=f"127.0.0.1:{listen}", admin=f"127.0.0.1:{admin}")
            await asyncio.to_thread(path.write_text, text)
            # subprocess.Popen (vfork), not the event loop's fork: see ModelProcess.start.
            process = subprocess.Popen(  # noqa: ASYNC220 - vfork+exec returns at once
                [sys.executable, "-m", "mlmirror", "serve", "--config", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            try:
                await asyncio.to_thread(wait_for_port, listen)
                await asyncio.to_thread(wait_for_port, admin)
                primary.delay = delay
                signalled = [0.0]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:

                    async def terminate(seconds: float) -> None:
                        await asyncio.sleep(seconds * 0.3)
                        signalled[0] = time.perf_counter()
                        process.send_signal(signal.SIGTERM)

                    baseline, fault = await _phases(channel, calls, rate, _nothing, terminate)
                _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    await asyncio.to_thread(process.wait)
    at = signalled[0]
    in_flight = [o for o in fault if o.started < at - 0.01]  # started well before the signal
    after = [o for o in fault if o.started > at + 0.01]
    completed = sum(o.code == "OK" for o in in_flight)
    refused = Counter(o.code for o in after)
    return Result(
        f"SIGTERM to the proxy process (primary +{delay * 1e3:.0f} ms)",
        baseline,
        fault,
        None,
        f"calls started before the signal: {completed}/{len(in_flight)} completed OK (drained within "
        f"shutdown_grace); calls started after it: {dict(refused)} (refused: the listener is closed; a front "
        f"balancer retries them elsewhere). Exit code {process.returncode}.",
        {
            "in_flight": len(in_flight),
            "completed": completed,
            "refused": refused,
            "returncode": process.returncode,
            "stderr": stderr.decode(errors="replace"),
        },
    )


#: name -> scenario(calls, rate)
SCENARIOS: dict[str, Callable[[int, float], Awaitable[Result]]] = {
    "primary-killed": primary_killed,
    "primary-slow": primary_slow,
    "primary-failing": primary_failing,
    "shadow-hung": shadow_hung,
    "shadow-killed": shadow_killed,
    "drift-raising": drift_raising,
    "reloads": reloads,
    "sigterm": sigterm,
}


def p99s(result: Result) -> tuple[float, float]:
    """(baseline p99, fault-phase p99) in ms, of calls that ended OK."""
    return (
        p99_ms([o for o in result.baseline if o.code == "OK"]),
        p99_ms([o for o in result.fault if o.code == "OK"]),
    )


def accounted(result: Result) -> dict[str, tuple[float, float]]:
    """Per shadow: (copies sampled = calls the proxy answered on the route, finished + dropped + pending)."""
    if result.scrape is None:
        return {}
    return {name: (result.scrape.answered, copies.total()) for name, copies in result.scrape.copies.items()}


__all__ += ["Copies", "accounted", "p99s"]

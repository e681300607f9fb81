"""``mlmirror demo``: three demo models, the proxy in front of them, traffic, and a running commentary.

The story, over ``duration`` seconds in three equal acts:
1. production answers every call;
2. production goes down: calls fall back to the baseline model, the circuit opens, clients see no error;
3. production comes back: a half-open probe closes the circuit and traffic returns to it — and the flowers' petals
   grow 1 cm longer: the drift engine flags petal length (input[2]) in production's next window.

All along, the candidate model gets a fire-and-forget copy of every iris call as a shadow; the commentary follows
its agreement with production and ends with the shadow table (``mlmirror shadows``).

The dashboard (``GET /`` on the admin port) shows the same story; its address is the first line printed, and the
proxy keeps serving it for ``linger`` seconds after the traffic ends (Ctrl-C stops it sooner).
"""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
import time
from collections.abc import Callable
from typing import TextIO

import grpc
from mlmirror.cli.shadows import render_shadows
from mlmirror.config import parse_config
from mlmirror.demo.models import MODELS, serve_model
from mlmirror.demo.traffic import TrafficStats, Window, run_traffic
from mlmirror.observing.drift.report import render_drift
from mlmirror.runtime.proxy import Proxy

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = """\
listen: {listen}
admin: {admin}
shutdown_grace: 5s
upstreams:
  production:
    address: 127.0.0.1:{production}
    timeout: 500ms
    circuit: {{failures: 3, ejection: 1s, max_ejection: 4s}}
    health_check: {{interval: 500ms, timeout: 250ms}}
  baseline:
    address: 127.0.0.1:{baseline}
    timeout: 500ms
  candidate:
    address: 127.0.0.1:{candidate}
    timeout: 500ms
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    fallback: [baseline]
    shadows: [{{upstream: candidate}}]
    compare: {{classification: argmax, output: probabilities}}
    promotion: {{window: 1000, min_samples: 200, agreement: 0.9}}
    drift: {{window: {window}, capture: {window}, bins: 10}}
    static_response:
      model_version: static
      outputs:
        - {{name: probabilities, datatype: FP32, shape: [-1, 3], data: [0.3333, 0.3333, 0.3334]}}
        - {{name: label, datatype: INT64, shape: [-1], data: [0]}}
  - name: iris-candidate
    match: {{model: iris-candidate}}
    primary: candidate
  - name: default
    match: {{}}
    primary: production
"""


async def run_demo(
    *,
    duration: float = 30.0,
    rate: float = 50.0,
    listen: str = "127.0.0.1:8500",
    admin: str = "127.0.0.1:9500",
    linger: float = 60.0,
    out: TextIO = sys.stdout,
    outcome: list[int] | None = None,
) -> int:
    """Run the demo; returns 0 when clients saw no error, else 1. ``linger``: seconds the dashboard stays up after
    the traffic (the proxy and models idle); ``outcome`` gets the result appended once the story is told, so a
    Ctrl-C during the linger still knows it."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    servers: dict[str, grpc.aio.Server] = {}
    ports: dict[str, int] = {}
    proxy: Proxy | None = None
    stats = TrafficStats()
    try:
        for role in ("production", "baseline", "candidate"):
            servers[role], ports[role] = await serve_model(MODELS[role], "127.0.0.1:0", aliases=(f"iris-{role}",))
        window = max(50, int(rate * duration / 6))  # about one window per act
        config_text = DEMO_CONFIG.format(listen=listen, admin=admin, window=window, **ports)
        proxy = Proxy(parse_config(config_text, "<demo config>"))
        await proxy.start()
        target = f"127.0.0.1:{proxy.grpc_port}"
        if proxy.admin_port:
            say(f"dashboard: http://127.0.0.1:{proxy.admin_port}/   (open it in a browser; it updates every 2 s)")
        say(f"mlmirror demo: {duration:g}s of traffic at {rate:g} calls/s through the proxy on {target}")
        for role, port in ports.items():
            model = MODELS[role]
            say(f"  model server {role:<10} 127.0.0.1:{port:<6} ({model.name} v{model.version})")
        if proxy.admin_port:
            say(f"  admin: curl http://127.0.0.1:{proxy.admin_port}/status   (/metrics, /readyz)")
        say("config:\n" + textwrap.indent(config_text, "  "))
        await _play(proxy, servers, ports, stats, duration=duration, rate=rate, say=say)
        say("shadows (mlmirror shadows):\n" + textwrap.indent(render_shadows(proxy.status()), "  "))
        say("drift (mlmirror drift):\n" + textwrap.indent(render_drift(proxy.status()), "  "))
        say(_summary(stats))
        result = 0 if stats.total.calls == stats.total.codes.get("OK", 0) else 1
        if outcome is not None:
            outcome.append(result)
        if linger > 0 and proxy.admin_port:
            say(f"the dashboard stays up for {linger:g}s at http://127.0.0.1:{proxy.admin_port}/ (Ctrl-C stops it)")
            try:
                await asyncio.sleep(linger)
            except asyncio.CancelledError:
                say("stopped")
                raise
    finally:
        if proxy is not None:
            await proxy.stop(grace=2.0)
        for server in servers.values():
            await server.stop(None)
    return result


def _summary(stats: TrafficStats) -> str:
    total = stats.total
    errors = total.calls - total.codes.get("OK", 0)
    return (
        f"done: {total.calls} calls, {errors} client errors; served by "
        + ", ".join(f"{k} {v}" for k, v in total.served_by.most_common())
        + f"; p50 {total.percentile(50) * 1e3:.2f} ms, p99 {total.percentile(99) * 1e3:.2f} ms"
    )


async def _play(
    proxy: Proxy,
    servers: dict[str, grpc.aio.Server],
    ports: dict[str, int],
    stats: TrafficStats,
    *,
    duration: float,
    rate: float,
    say: Callable[[str], None],
) -> None:
    """Send traffic for ``duration`` seconds through the three acts, reporting once per window."""
    stop = asyncio.Event()
    shifted = asyncio.Event()
    models = ("iris",) * 9 + ("iris-candidate",)
    target = f"127.0.0.1:{proxy.grpc_port}"
    traffic = asyncio.ensure_future(
        run_traffic(target, rate=rate, stop=stop, stats=stats, models=models, shifted=shifted)
    )
    started = time.perf_counter()
    act = 1
    say("act 1: production serves")
    report_every = max(1.0, duration / 15)
    next_report = started + report_every
    try:
        while (elapsed := time.perf_counter() - started) < duration:
            if act == 1 and elapsed >= duration / 3:
                act = 2
                say("act 2: production goes down (its server stops)")
                await servers["production"].stop(None)
            elif act == 2 and elapsed >= 2 * duration / 3:
                act = 3
                say("act 3: production is back on the same port, and the petals grow 1 cm longer (input drift)")
                shifted.set()
                servers["production"], _ = await serve_model(
                    MODELS["production"], f"127.0.0.1:{ports['production']}", aliases=("iris-production",)
                )
            if time.perf_counter() >= next_report:
                next_report += report_every
                say(_report_line(time.perf_counter() - started, stats.take_window(), report_every, proxy))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await traffic


def _report_line(elapsed: float, window: Window, seconds: float, proxy: Proxy) -> str:
    ok = window.codes.get("OK", 0)
    share = ", ".join(f"{name} {n}" for name, n in window.served_by.most_common())
    circuit = proxy.table.targets["production"].breaker.state.name.lower() if proxy.table else "?"
    p50, p99 = window.percentile(50) * 1e3, window.percentile(99) * 1e3
    latency = "" if math.isnan(p50) else f" | p50 {p50:5.2f} ms p99 {p99:6.2f} ms"
    errors = window.calls - ok
    iris = next((r for r in proxy.status()["routes"] if r["name"] == "iris"), None)  # one status per line
    return (
        f"[{elapsed:5.1f}s] {window.calls / seconds:5.1f} calls/s | errors {errors} | served by {share or '-'}"
        f"{latency} | production circuit {circuit}{_shadow_summary(iris)}{_drift_summary(iris)}"
    )


def _drift_summary(route: dict | None) -> str:
    """`` | drifted inputs version 1 window 2: input[2]`` — what the latest window of each version flagged."""
    if route is None or not route["drift"]:
        return ""
    parts = []
    for window in route["drift"]["latest"]:
        inputs = [name for name in window["drifted"] if name.startswith("input")]
        parts.append(f"version {window['version']} window {window['index']}: {', '.join(inputs) or 'none'}")
    return f" | drifted inputs {'; '.join(parts)}" if parts else " | drift: reference/window filling"


def _shadow_summary(route: dict | None) -> str:
    """`` | candidate agrees 97.8% (n=412) not yet`` for the iris route's shadow (``route``: its /status entry)."""
    if route is None or not route["shadows"]:
        return ""
    shadow = route["shadows"][0]
    window = shadow["window"]
    agreement = "-" if window["agreement"] is None else f"{window['agreement']:.1%}"
    verdict = "PROMOTABLE" if shadow["promotable"] else "not yet"
    return f" | {shadow['name']} agrees {agreement} (n={window['samples']}) {verdict}"


def main(duration: float, rate: float, listen: str, admin: str, linger: float = 60.0) -> int:
    from mlmirror.eventloop import run

    outcome: list[int] = []
    try:
        return run(run_demo(duration=duration, rate=rate, listen=listen, admin=admin, linger=linger, outcome=outcome))
    except KeyboardInterrupt:
        return outcome[0] if outcome else 130
    except (OSError, RuntimeError, grpc.RpcError) as exc:
        print(f"mlmirror demo: {exc}", file=sys.stderr)
        return 2

"""Zero-downtime operations on the real ``mlmirror serve`` process: SIGTERM drains, SIGHUP reloads, and a killed
primary costs clients nothing when a fallback is configured."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.config import Route, parse_config
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.errors import StartError
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.kinds import PART_KINDS
from mlmirror.observing.parts import PartContext, PartKind, RoutePart
from mlmirror.runtime.proxy import Proxy
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from loadtest.ports import free_port, wait_for_port
from tests.support import ECHO, REPO, EchoServer, http_get, mlmirror, model_server, through_proxy, wait_until

pytestmark = pytest.mark.slow

UNARY = ECHO + "Unary"


def write_config(path: Path, admin_port: int, listen_port: int, primary: str, upstreams: dict[str, str]) -> None:
    lines = [
        f"listen: 127.0.0.1:{listen_port}",
        f"admin: 127.0.0.1:{admin_port}",
        "shutdown_delay: 0s",  # straight to draining: the delay before it is tested in test_shutdown.py
        "shutdown_grace: 10s",
        f"method_types: {{{UNARY}: unary_unary}}",
        "upstreams:",
        *[
            f"  {name}: {{address: {address}, health_check: {{interval: 200ms}}}}"
            for name, address in upstreams.items()
        ],
        "routes:",
        f"  - {{name: main, match: {{}}, primary: {primary}}}",
    ]
    path.write_text("\n".join(lines) + "\n")


class ServeProcess:
    """``mlmirror serve`` in a subprocess, with its ports."""

    def __init__(self, config: Path, admin_port: int, listen_port: int) -> None:
        self.admin_port = admin_port
        self.listen_port = listen_port
        self.process = mlmirror("serve", "--config", str(config))
        wait_for_port(admin_port)
        wait_for_port(listen_port)

    def metric(self, name: str) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.admin_port}/metrics")
        assert status == 200
        return "\n".join(line for line in body.splitlines() if line.startswith(name))

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr


async def call(channel: grpc.aio.Channel, payload: bytes, **kwargs) -> tuple[grpc.StatusCode, str | bytes]:
    """(status, served_by) of one unary echo call."""
    rpc = channel.unary_unary(UNARY)(payload, **kwargs)
    try:
        await rpc
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    return code, dict(await rpc.trailing_metadata() or ()).get("x-mlmirror-served-by", "")


async def test_sigterm_drains_in_flight_calls_and_exits_zero(tmp_path: Path):
    admin_port, listen_port = free_port(), free_port()
    async with EchoServer("slow") as upstream:
        upstream.sleep = 1.0
        config = tmp_path / "mlmirror.yaml"
        write_config(config, admin_port, listen_port, "slow", {"slow": upstream.address})
        served = await asyncio.to_thread(ServeProcess, config, admin_port, listen_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listen_port}") as channel:
            in_flight = [asyncio.ensure_future(call(channel, f"{i}".encode(), timeout=10)) for i in range(20)]
            await wait_until(lambda: len(upstream.received) == 20, 30, "all 20 calls to wait on the upstream")
            started = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*in_flight)
            drained_in = time.monotonic() - started
            await asyncio.sleep(0.2)
            late = await call(channel, b"late", timeout=2)
        returncode, stderr = await asyncio.to_thread(served.finish)
    assert results == [(grpc.StatusCode.OK, "slow")] * 20, stderr
    assert drained_in < 8.0  # the calls' last second, not the 10 s shutdown grace
    assert late[0] is grpc.StatusCode.UNAVAILABLE  # stopped accepting
    assert returncode == 0, stderr
    assert "SIGTERM: graceful stop" in stderr
    assert "draining 20 in-flight calls" in stderr


async def test_sighup_reload_under_traffic_fails_no_call_and_switches_routes(tmp_path: Path):
    admin_port, listen_port = free_port(), free_port()
    async with EchoServer("a") as a, EchoServer("b") as b:
        a.sleep = 0.5  # calls in flight on the old table during the reload
        config = tmp_path / "mlmirror.yaml"
        write_config(config, admin_port, listen_port, "a", {"a": a.address})
        served = await asyncio.to_thread(ServeProcess, config, admin_port, listen_port)
        results: list[tuple[grpc.StatusCode, str]] = []
        stop = asyncio.Event()

        async def traffic(channel: grpc.aio.Channel) -> None:
            pending = set()
            n = 0
            while not stop.is_set():
                task = asyncio.ensure_future(call(channel, f"{n}".encode(), timeout=5))
                task.add_done_callback(lambda t: results.append(t.result()))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)

        def answered_by(name: str) -> int:
            return sum(1 for _, served_by in results if served_by == name)

        def reloaded(result: str) -> bool:
            return f'mlmirror_config_reloads_total{{result="{result}"}} 1.0' in served.metric("mlmirror_config")

        # Each step waits for what it needs (answers, a reload taken), not for a time a busy machine may not keep.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listen_port}") as channel:
            load = asyncio.ensure_future(traffic(channel))
            await wait_until(lambda: answered_by("a") > 20, 30, "calls answered by a")
            # Reload 1: a is removed, b serves. Calls in flight to a must finish on a.
            write_config(config, admin_port, listen_port, "b", {"b": b.address})
            served.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: reloaded("success"), 30, "the first reload")
            await wait_until(lambda: answered_by("b") > 50, 30, "calls answered by b")
            # Reload 2: an invalid file is rejected and b keeps serving.
            config.write_text(config.read_text().replace("primary: b", "primary: nowhere"))
            served.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: reloaded("failure"), 30, "the rejected reload")
            await wait_until(lambda: answered_by("b") > 100, 30, "more calls answered by b")
            stop.set()
            await load
        reloads = await asyncio.to_thread(served.metric, "mlmirror_config_reloads_total")
        served.process.send_signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(served.finish)
    codes = Counter(code for code, _ in results)
    by = Counter(served_by for _, served_by in results)
    assert codes == {grpc.StatusCode.OK: len(results)}, (codes, stderr)
    assert by["a"] > 20
    assert by["b"] > 100
    assert set(by) == {"a", "b"}
    assert len(a.received) == by["a"]  # every call sent to a was answered by a, none lost in the swap
    assert 'mlmirror_config_reloads_total{result="success"} 1.0' in reloads
    assert 'mlmirror_config_reloads_total{result="failure"} 1.0' in reloads
    assert f"config reload rejected, keeping the current config: {config}:" in stderr
    assert "routes[0].primary: unknown upstream 'nowhere'" in stderr
    assert returncode == 0


async def test_killing_the_primary_mid_traffic_costs_clients_nothing():
    primary_port = free_port()
    # subprocess.Popen (vfork), not the event loop's fork: gRPC's fork handlers must not run in this process.
    primary = subprocess.Popen(  # noqa: ASYNC220 - vfork+exec returns at once
        [sys.executable, "-m", "mlmirror", "model-server", "--model", "production", "--listen",
         f"127.0.0.1:{primary_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_port, primary_port)
        async with model_server("baseline") as baseline_port:
            config = f"""
            upstreams:
              production: {{address: 127.0.0.1:{primary_port}, timeout: 1s}}
              baseline: {{address: 127.0.0.1:{baseline_port}, timeout: 1s}}
            routes:
              - {{name: iris, match: {{model: iris}}, primary: production, fallback: [baseline]}}
            """
            rng = np.random.default_rng(7)
            requests = [infer_request(sample_features(rng, 4), request_id=f"r{i}") for i in range(64)]
            async with through_proxy(config) as (proxy, channel):
                stub = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                outcomes: list[tuple[grpc.StatusCode, str]] = []

                async def one(i: int) -> None:
                    rpc = stub(requests[i % len(requests)], timeout=5)
                    try:
                        await rpc
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as error:
                        code = error.code()
                    outcomes.append((code, dict(await rpc.trailing_metadata()).get("x-mlmirror-served-by", "")))

                tasks = []
                for i in range(600):  # 3 s at 200 calls/s; the primary dies after 1 s
                    if i == 200:
                        primary.send_signal(signal.SIGKILL)
                    tasks.append(asyncio.ensure_future(one(i)))
                    await asyncio.sleep(0.005)
                await asyncio.gather(*tasks)
                fallbacks = proxy.metrics.registry.get_sample_value(
                    "mlmirror_fallbacks_total",
                    {"route": "iris", "from_upstream": "production", "to": "baseline", "reason": "circuit_open"},
                )
    finally:
        if primary.poll() is None:
            primary.kill()
        await asyncio.to_thread(primary.wait)
    codes = Counter(code for code, _ in outcomes)
    by = Counter(served_by for _, served_by in outcomes)
    assert codes == {grpc.StatusCode.OK: 600}
    assert by["production"] >= 150
    assert by["baseline"] >= 300
    assert fallbacks > 100  # the circuit opened and later calls skipped the dead primary


async def test_serve_exits_with_a_clear_message_when_its_port_is_taken(tmp_path: Path):
    async with EchoServer("a") as echo:
        config = tmp_path / "mlmirror.yaml"
        listen_port = int(echo.address.rsplit(":", 1)[1])  # already bound by the echo server
        write_config(config, free_port(), listen_port, "a", {"a": echo.address})
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mlmirror", "serve", "--config", str(config)],
            capture_output=True, text=True, cwd=REPO, timeout=30,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"mlmirror: cannot listen on 127.0.0.1:{listen_port}" in done.stderr
    assert "Traceback" not in done.stderr


# --- per-route parts: one registry, no edits to the proxy for a new kind ------------------------------------------


class CountingPart(RoutePart):
    """A per-route consumer defined here, not in mlmirror: counts what its route's tap offers and logs its hooks."""

    def __init__(self, route: Route, log: list[str], refuse: set[str], calls: int = 0) -> None:
        if route.name in refuse:
            raise StartError(f"route {route.name}: refused by the counting kind")
        self.name = f"counting:{route.name}"
        self.route = route.name
        self.primary = route.primary
        self.calls = calls
        self._log = log
        self._refuse = refuse
        log.append(f"build {route.name}")

    def offer(self, record: CallRecord) -> None:
        self.calls += 1

    def status(self) -> object:
        return {"calls": self.calls}

    def reloaded(self, route: Route, context: PartContext) -> RoutePart:
        if route.primary == self.primary:
            return self
        return CountingPart(route, self._log, self._refuse, self.calls)  # a new part that carries the count over

    def start(self) -> None:
        self._log.append(f"start {self.route}")

    def close(self, successor: RoutePart | None) -> None:
        self._log.append(f"close {self.route} ({'replaced' if successor is not None else 'removed'})")

    async def stop(self) -> None:
        self._log.append(f"stop {self.route}")


class CountingCollector(Collector):
    def __init__(self, parts) -> None:
        self._parts = parts

    def collect(self):
        family = CounterMetricFamily("test_counted", "Calls the counting parts saw.", labels=["route"])
        for part in self._parts():
            family.add_metric([part.route], part.calls)
        yield family


def counting_kind(log: list[str], refuse: set[str] | None = None) -> PartKind:
    """The kind: routes other than ``plain`` get a counting part; one for a route in ``refuse`` raises."""
    refused = refuse if refuse is not None else set()
    return PartKind(
        key="counting",
        configured=lambda route: route.name != "plain",
        build=lambda route, context: CountingPart(route, log, refused),
        collector=CountingCollector,
    )


def two_routes(echo: str, primary: str = "echo", *, with_b: bool = True, plain: str = "") -> str:
    """Routes a and b (with the counting kind) on ``primary``, and plain (without; ``plain``: more of its keys)."""
    b = f"  - {{name: b, match: {{method: {ECHO}Other}}, primary: {primary}}}\n" if with_b else ""
    return (
        f"method_types: {{{UNARY}: unary_unary}}\nupstreams: {{echo: {echo}, again: {echo}}}\nroutes:\n"
        f"  - {{name: a, match: {{method: {UNARY}}}, primary: {primary}}}\n{b}"
        f"  - {{name: plain, match: {{}}, primary: echo{plain}}}\n"
    )


async def test_a_kind_of_part_defined_outside_mlmirror_is_fed_reported_reloaded_and_stopped():
    log: list[str] = []
    async with EchoServer("echo") as echo:
        proxy = Proxy(parse_config("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n" + two_routes(echo.address)),
                      kinds=(*PART_KINDS, counting_kind(log)))  # fmt: skip
        await proxy.start()
        try:
            assert log == ["build a", "build b", "start a", "start b"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                for _ in range(5):
                    assert (await call(channel, b"x"))[0] == grpc.StatusCode.OK
            routes = {route["name"]: route for route in proxy.status()["routes"]}
            assert routes["a"]["counting"] == {"calls": 5}
            assert routes["b"]["counting"] == {"calls": 0}
            assert routes["plain"]["counting"] is None  # the kind's absent value
            assert routes["a"]["shadows"] == []  # the registry's kinds too
            assert routes["a"]["drift"] is None
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
            assert status == 200
            assert 'test_counted_total{route="a"} 5.0' in body

            kept = proxy.parts.get("a", "counting")
            await proxy.reload(parse_config(two_routes(echo.address), "<same>"))
            assert proxy.parts.get("a", "counting") is kept  # unchanged: the same part, nothing rebuilt
            assert log == ["build a", "build b", "start a", "start b"]

            await proxy.reload(parse_config(two_routes(echo.address, "again", with_b=False), "<changed>"))
            assert log[4:] == ["build a", "close a (replaced)", "close b (removed)", "start a"]
            assert proxy.parts.get("a", "counting").calls == 5  # the successor took the count over
            assert proxy.parts.get("b", "counting") is None
        finally:
            await proxy.stop(grace=0)
        assert log[-1] == "stop a"


async def test_a_part_that_refuses_a_reload_changes_nothing(tmp_path: Path):
    log: list[str] = []
    refuse: set[str] = set()
    async with EchoServer("echo") as echo:
        capture = tmp_path / "capture"
        text = two_routes(echo.address, plain=f", capture: {{path: {capture}}}")
        proxy = Proxy(parse_config("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n" + text),
                      kinds=(*PART_KINDS, counting_kind(log, refuse)))  # fmt: skip
        await proxy.start()
        try:
            before = {(part.name, id(part)) for part in proxy.parts}
            writer = proxy.parts.get("plain", "capture").writer
            refuse.add("a")
            changed = two_routes(echo.address, "again", plain=f", capture: {{path: {capture}, percent: 50}}")
            with pytest.raises(StartError, match="refused by the counting kind"):
                await proxy.reload(parse_config(changed, "<refused>"))
            assert {(part.name, id(part)) for part in proxy.parts} == before
            assert proxy.parts.get("plain", "capture").writer is writer
            assert writer.alive  # not closed: the capture part built for the refused config was never started
            assert [entry for entry in log if entry.startswith(("close", "start"))] == ["start a", "start b"]
            assert proxy.table is not None
            assert proxy.table.config.routes[0].primary == "echo"
        finally:
            await proxy.stop(grace=0)

"""A rolling restart behind the real Envoy (envoy/front-proxy.yaml) is invisible to clients: two ``mlmirror serve``
instances, each stopped with SIGTERM, waited for and started again, one after the other, five rounds, under steady
load from several client threads through Envoy: no client error. The figures go to docs/RELIABILITY.md."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from loadtest.envoy import FRONT_PROXY, load, on_ports
from loadtest.ports import free_port
from tests.support import ECHO, REPO, EchoServer, envoy_running, http_get, wait_until

pytestmark = [pytest.mark.process, pytest.mark.slow]  # starts Envoy and mlmirror processes

UNARY = ECHO + "Unary"
ROUNDS = 5
THREADS = 8


class Instance:
    """One ``mlmirror serve`` (supervisor, worker, observing process) on fixed ports, started again and again."""

    def __init__(self, folder: Path, name: str, upstream: str) -> None:
        self.listen, self.admin = free_port(), free_port()
        self.config = folder / f"{name}.yaml"
        self.config.write_text(f"""
listen: 127.0.0.1:{self.listen}
admin: 127.0.0.1:{self.admin}
shutdown_grace: 10s
method_types: {{{UNARY}: unary_unary}}
upstreams: {{model: {{address: {upstream}, health_check: {{interval: 200ms}}}}}}
routes: [{{name: main, match: {{}}, primary: model}}]
""")  # shutdown_delay: the default
        self.log = folder / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.exits: list[int] = []

    def start(self) -> None:
        with self.log.open("a") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlmirror", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def ready(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return http_get(f"http://127.0.0.1:{self.admin}/readyz")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM and wait for the exit (delay, drain, the observer)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.exits.append(self.process.wait(60))

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def healthy_in_envoy(admin: int, port: int) -> bool:
    code, body = http_get(f"http://127.0.0.1:{admin}/clusters")
    return code == 200 and f"mlmirror::127.0.0.1:{port}::health_flags::healthy" in body


class Load:
    """Client threads calling through Envoy one call after the other until ``stop``; every outcome counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.codes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    async def __aenter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the threads, joined from a thread: the upstream on this event loop must answer their last calls."""
        self.stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 60)

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            call = ch.unary_unary(UNARY)
            while not self.stop.is_set():
                try:
                    call(b"x", timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                    with self._lock:
                        self.errors.append(f"{time.monotonic():.2f} {code}: {error.details()}")
                with self._lock:
                    self.codes[code] += 1


async def polled(condition: Callable[[], bool], what: str, within: float = 90.0) -> None:
    """Wait for ``condition`` (which blocks: it asks a process over HTTP), asked from a thread so that the
    upstream on this event loop keeps serving."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_rolling_restarts_behind_envoy_fail_no_client_call(tmp_path: Path):
    async with EchoServer("model") as upstream:
        upstream.sleep = 0.02  # calls are in flight when an instance gets SIGTERM
        instances = [Instance(tmp_path, name, upstream.address) for name in ("a", "b")]
        events: list[str] = []
        try:
            for instance in instances:
                instance.start()
            for instance in instances:
                await polled(instance.ready, "an instance to be ready")
            listen, admin = free_port(), free_port()
            config = on_ports(load(FRONT_PROXY), listen, admin, {"mlmirror": [i.listen for i in instances]})
            async with envoy_running(config, tmp_path):
                for instance in instances:
                    await polled(functools.partial(healthy_in_envoy, admin, instance.listen), "Envoy health checks")
                started = time.monotonic()
                async with Load(listen) as traffic:
                    await wait_until(lambda: traffic.codes["OK"] > 100, 60, "steady load through Envoy")
                    events.append(f"{time.monotonic():.2f} load steady")
                    for _ in range(ROUNDS):
                        for instance in instances:
                            events.append(f"{time.monotonic():.2f} SIGTERM {instance.config.stem}")
                            await asyncio.to_thread(instance.stop)
                            events.append(f"{time.monotonic():.2f} exited, starting {instance.config.stem}")
                            instance.start()
                            await polled(instance.ready, "the restarted instance to be ready")
                            events.append(f"{time.monotonic():.2f} ready {instance.config.stem}")
                            await polled(functools.partial(healthy_in_envoy, admin, instance.listen),
                                         "Envoy to take the restarted instance back")  # fmt: skip
                            events.append(f"{time.monotonic():.2f} healthy in Envoy {instance.config.stem}")
                    before = traffic.codes["OK"]
                    await wait_until(lambda: traffic.codes["OK"] > before + 100, 60, "load after the last restart")
                elapsed = time.monotonic() - started
        finally:
            for instance in instances:
                with contextlib.suppress(Exception):
                    instance.kill()
    logs = "".join(f"--- {i.log.name}\n{i.log.read_text()[-4000:]}" for i in instances)
    assert traffic.errors == [], "\n".join([*traffic.errors[:20], *events, logs])
    assert [instance.exits for instance in instances] == [[0] * ROUNDS, [0] * ROUNDS]
    calls = sum(traffic.codes.values())
    assert calls == traffic.codes["OK"] > 1000
    print(f"rolling restart: {2 * ROUNDS} restarts in {elapsed:.1f}s, {calls} calls through Envoy, 0 errors")

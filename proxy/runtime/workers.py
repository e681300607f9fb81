"""``mlmirror serve --workers N``: N worker processes share the listener's port (SO_REUSEPORT) and one hub watches.

The supervisor (this process) runs the hub — a ``Proxy`` in the hub role (proxy/runtime/role.py): the one place shadow
copies are made and compared and drift is measured — and the admin endpoint, and starts the workers as child
processes (``python -m mlmirror.runtime.workers``). Each worker relays client calls like a lone proxy and hands
the answered calls of watched routes to the hub over a Unix socket (proxy/handoff/transport.py), batched and lossy: a
slow hub costs a worker counted drops, never a call. So shadow and drift state is one truth by construction, and the
proxy's CPU per call in a worker no longer includes the copies.

The admin endpoint merges: ``/metrics`` is the workers' expositions merged with the hub's
(proxy/admin/metrics_merge.py);
``/status`` is the hub's (shadows, drift) with the workers' call counts summed and a ``workers`` list; ``/readyz``
is ready when every worker is; ``/reload`` and ``/promote`` act on the hub, then on every worker; ``/outcomes``
and the Feedback gRPC method (relayed by the workers) reach the hub's ground truth.

A worker that exits is started again (after 1 s, doubling to 30 s while it keeps failing within a minute). A
worker whose hub goes away (the supervisor died) stops by itself. SIGTERM or SIGINT stops the workers first
(each drains its calls), then the hub; a second one kills the workers and exits 1. SIGHUP reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlmirror.admin.http import AdminServer, Request, Response, answer_promotion, endpoints
from mlmirror.admin.metrics_merge import merge_expositions
from mlmirror.config import Config, load_config
from mlmirror.errors import StartError
from mlmirror.handoff.tap import CallRecord
from mlmirror.handoff.transport import HandoffReceiver, HandoffSender
from mlmirror.metrics import Metrics
from mlmirror.observing.shadows.promotion import PromotionError
from mlmirror.runtime.proxy import Proxy, admin_token
from mlmirror.runtime.role import Role
from mlmirror.serving.table import RouteRuntime, RouteTable
from prometheus_client import Counter, Gauge, generate_latest

__all__ = ["Supervisor", "main"]

log = logging.getLogger(__name__)

HANDOFF_SOCKET = "handoff.sock"
FEEDBACK_SOCKET = "feedback.sock"
_START_TIMEOUT = 60.0  # seconds for every worker to start and say hello
_RESTART_BACKOFF = (1.0, 30.0)  # seconds: first delay, cap


@dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    index: int
    process: subprocess.Popen | None = None
    admin_port: int | None = None
    pid: int | None = None
    restarts: int = 0
    started: float = 0.0
    greeted: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs the hub and the admin endpoint, and keeps ``count`` workers alive."""

    def __init__(self, config_path: str, count: int, *, use_uvloop: bool = True, log_level: str = "info") -> None:
        self.config_path = str(Path(config_path).resolve())
        self.count = count
        self._worker_args = ["--log-level", log_level, *([] if use_uvloop else ["--no-uvloop"])]
        self.config: Config = load_config(self.config_path)  # first: a bad file leaves nothing behind
        self.folder = Path(tempfile.mkdtemp(prefix="mlmirror-"))  # mode 0700: only this user reaches the sockets
        self.metrics = Metrics()
        self.hub = Proxy(
            self.config, metrics=self.metrics, role=Role("hub", listen=f"unix:{self.folder / FEEDBACK_SOCKET}")
        )
        self.workers = [Worker(i) for i in range(count)]
        self._received = Counter(
            "mlmirror_handoff_received", "Answered calls the hub received from each worker.", ["worker"],
            registry=self.metrics.registry,
        )  # fmt: skip
        self._restarts = Counter(
            "mlmirror_worker_restarts", "Worker processes started again after they exited.", ["worker"],
            registry=self.metrics.registry,
        )  # fmt: skip
        Gauge("mlmirror_workers", "Worker processes running now.", registry=self.metrics.registry).set_function(
            lambda: sum(1 for w in self.workers if w.process is not None and w.process.poll() is None)
        )
        malformed = Counter(
            "mlmirror_handoff_malformed", "Damaged hand-off frames the hub received, by worker.", ["worker"],
            registry=self.metrics.registry,
        )  # fmt: skip
        self._receiver = HandoffReceiver(
            self.folder / HANDOFF_SOCKET, self._deliver, self._greeted, self._received, malformed
        )
        self._routes: tuple[RouteTable | None, dict[str, RouteRuntime]] = (None, {})
        self._admin: AdminServer | None = None
        self._token = admin_token(self.config)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # --- start and stop -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the hub, the hand-off socket, the workers (waiting until each has said hello) and the admin."""
        try:
            await self.hub.start()
            await self._receiver.start()
            for worker in self.workers:
                await self._spawn(worker)
            waits = [asyncio.ensure_future(w.greeted.wait()) for w in self.workers]
            _, pending = await asyncio.wait(waits, timeout=_START_TIMEOUT)
            for wait in pending:
                wait.cancel()
            missing = [w.index for w in self.workers if not w.greeted.is_set()]
            if missing:
                raise StartError(f"workers {missing} did not start within {_START_TIMEOUT:g}s (see their log)")
            if self.config.admin is not None:
                self._admin = AdminServer(self.config.admin, endpoints(self), token=self._token)
                try:
                    await self._admin.start()
                except OSError as exc:
                    self._admin = None
                    raise StartError(f"cannot serve the admin endpoint on {self.config.admin}: {exc}") from None
        except BaseException:
            await self.stop()
            raise
        log.info("mlmirror: %d workers on %s; admin on %s", self.count, self.config.listen,
                 f"http://{self.config.admin}" if self.config.admin else "(disabled)")  # fmt: skip

    async def _spawn(self, worker: Worker) -> None:
        worker.greeted.clear()
        worker.admin_port = None
        # subprocess.Popen, not the event loop's spawn: CPython starts the child with vfork, so gRPC's fork handlers
        # never run in a process full of gRPC threads. New session: a terminal's Ctrl-C reaches the supervisor only,
        # which then stops the workers in order.
        worker.process = subprocess.Popen(  # noqa: ASYNC220 - vfork+exec returns at once
            [sys.executable, "-m", "mlmirror.runtime.workers", "--config", self.config_path,
             "--index", str(worker.index), "--folder", str(self.folder), *self._worker_args],
            start_new_session=True,
        )  # fmt: skip
        worker.pid = worker.process.pid
        worker.started = time.monotonic()
        self._background(self._watch(worker, worker.process))

    async def _watch(self, worker: Worker, process: subprocess.Popen) -> None:
        """Start ``worker`` again when its process exits, unless the group is stopping."""
        code = await asyncio.to_thread(process.wait)
        if self._stopping or worker.process is not process:
            return
        quick = time.monotonic() - worker.started < 60.0
        delay = min(_RESTART_BACKOFF[0] * 2 ** (worker.restarts if quick else 0), _RESTART_BACKOFF[1])
        log.error("worker %d (pid %d) exited with %s; starting it again in %.0fs", worker.index, process.pid, code,
                  delay)  # fmt: skip
        await asyncio.sleep(delay)
        if self._stopping:
            return
        worker.restarts += 1
        self._restarts.labels(str(worker.index)).inc()
        await self._spawn(worker)

    def _background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """SIGTERM every worker and wait for them to drain (their ``shutdown_grace``, plus 5 s), then stop the hub."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        running = [w.process for w in self.workers if w.process is not None and w.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + 5.0
        for process in running:
            try:
                await asyncio.to_thread(process.wait, max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        current = asyncio.current_task()  # stop() itself may run as one of the background tasks
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await self._receiver.close()
        await self.hub.stop()
        if self._admin is not None:
            await self._admin.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT (the ordered stop; a second one kills the workers and exits at once);
        SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_stop_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                log.info("%s: stopping the workers, then the hub", signal.Signals(signum).name)
                self._background(self.stop())
                return
            log.warning("%s again: killing the workers and exiting without waiting", signal.Signals(signum).name)
            for worker in self.workers:
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.kill()
            shutil.rmtree(self.folder, ignore_errors=True)
            os._exit(1)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self.reload()))
        await self._stopped.wait()

    # --- the hand-off -------------------------------------------------------------------------------------------

    def _greeted(self, hello: dict) -> None:
        index = hello.get("index")
        if isinstance(index, int) and 0 <= index < self.count:
            worker = self.workers[index]
            worker.admin_port = hello.get("admin_port")
            worker.pid = hello.get("pid", worker.pid)
            worker.greeted.set()

    def _deliver(self, record: CallRecord) -> None:
        """A worker's answered call, to its route's observers in the hub (never raises: the tap counts errors)."""
        table = self.hub.table
        cached, routes = self._routes
        if cached is not table:
            routes = {route.name: route for route in table.routes} if table is not None else {}
            self._routes = (table, routes)
        route = routes.get(record.route)
        if route is not None and route.tap:
            route.tap.offer(record)

    # --- talking to the workers' admin endpoints ----------------------------------------------------------------

    async def _ask(self, worker: Worker, method: str, path: str) -> tuple[int, bytes]:
        """(status, body) of one request to a worker's internal admin endpoint; (0, reason) when it cannot answer."""
        if worker.admin_port is None:
            return 0, b"not started"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", worker.admin_port), 5.0)
        except (OSError, TimeoutError) as exc:
            return 0, str(exc).encode()
        auth = f"Authorization: Bearer {self._token}\r\n" if self._token else ""
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: worker\r\n{auth}Content-Length: 0\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 30.0)
        except (OSError, TimeoutError) as exc:
            return 0, str(exc).encode()
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return 0, b"malformed answer"

    async def _ask_all(self, method: str, path: str) -> list[tuple[int, bytes]]:
        return list(await asyncio.gather(*(self._ask(w, method, path) for w in self.workers)))

    # --- admin endpoints ----------------------------------------------------------------------------------------

    async def _get_metrics(self, request: Request) -> Response:
        answers = await self._ask_all("GET", "/metrics")
        texts = {str(w.index): body.decode() for w, (code, body) in zip(self.workers, answers, strict=True)
                 if code == 200}  # fmt: skip
        hub = generate_latest(self.metrics.registry).decode()
        return Response(200, merge_expositions(hub, texts), "text/plain; version=0.0.4; charset=utf-8")

    async def _get_healthz(self, request: Request) -> Response:
        return Response.text("ok")

    async def _get_readyz(self, request: Request) -> Response:
        answers = await self._ask_all("GET", "/readyz")
        ready = not self._stopping and all(code == 200 for code, _ in answers)
        lines = [f"worker {w.index}: " + (body.decode().strip().replace("\n", "; ") or f"status {code}")
                 for w, (code, body) in zip(self.workers, answers, strict=True)]  # fmt: skip
        return Response.text("\n".join(["ready" if ready else "not ready", *lines]), 200 if ready else 503)

    async def status(self) -> dict:
        """The hub's status (shadows, drift) with the workers' call counts summed in, and the workers listed."""
        status = self.hub.status()
        answers = await self._ask_all("GET", "/status")
        workers = []
        calls: dict[str, dict[str, int]] = {}
        requests: dict[str, dict[str, int]] = {}
        inflight = 0
        ready = True
        for worker, (code, body) in zip(self.workers, answers, strict=True):
            entry: dict[str, object] = {"index": worker.index, "pid": worker.pid, "restarts": worker.restarts}
            if code == 200:
                own = json.loads(body)
                served = sum(sum(route["calls"].values()) for route in own["routes"])
                entry.update(ready=own["ready"], inflight_calls=own["inflight_calls"], calls=served)
                inflight += own["inflight_calls"]
                ready = ready and own["ready"]
                for route in own["routes"]:
                    _add(calls.setdefault(route["name"], {}), route["calls"])
                for name, upstream in own["upstreams"].items():
                    _add(requests.setdefault(name, {}), upstream["requests"])
            else:
                entry.update(ready=False, error=body.decode(errors="replace"))
                ready = False
            workers.append(entry)
        for route in status["routes"]:
            route["calls"] = dict(sorted(calls.get(route["name"], {}).items()))
        for name, upstream in status["upstreams"].items():
            upstream["requests"] = dict(sorted(requests.get(name, {}).items()))
        status.update(ready=ready and not self._stopping, inflight_calls=inflight, workers=workers)
        status["listen"] = {"grpc": self.config.listen, "admin": self.config.admin, "workers": self.count}
        return status

    async def _get_status(self, request: Request) -> Response:
        return Response.json(await self.status())

    async def reload(self) -> tuple[bool, list[str]]:
        """Reload the hub from the config file, then every worker; (all took it, what each said)."""
        if not await self.hub.reload_from_file(self.config_path):
            return False, ["hub: rejected (see the log); nothing changed"]
        answers = await self._ask_all("POST", "/reload")
        lines = ["hub: reloaded"] + [f"worker {w.index}: {code} {body.decode().strip()}"
                                     for w, (code, body) in zip(self.workers, answers, strict=True)]  # fmt: skip
        return all(code == 200 for code, _ in answers), lines

    async def _post_reload(self, request: Request) -> Response:
        ok, lines = await self.reload()
        return Response.text("\n".join(["reloaded" if ok else "reload incomplete", *lines]), 200 if ok else 400)

    async def _post_promote(self, request: Request) -> Response:
        return await answer_promotion(request, self.promote, PromotionError)

    async def promote(self, route: str, shadow: str, force: bool) -> str:
        """Promote in the hub (which holds the verdict), then force the same promotion in every worker."""
        message = await self.hub.promote(route, shadow, force=force)
        answers = await self._ask_all("POST", f"/promote?route={route}&shadow={shadow}&force=1")
        failed = [f"worker {w.index}: {code} {body.decode().strip()}"
                  for w, (code, body) in zip(self.workers, answers, strict=True) if code != 200]  # fmt: skip
        if failed:
            raise PromotionError("; ".join([f"{message}, but not in every worker", *failed]))
        return message

    async def handle_outcomes(self, request: Request) -> Response:
        return await self.hub.handle_outcomes(request)


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


# --- the worker process -----------------------------------------------------------------------------------------


async def run_worker(config_path: str, index: int, folder: Path) -> None:
    """One worker: a proxy on the shared port whose watched calls go to the hub; stops when the hub goes away."""
    config = load_config(config_path)
    metrics = Metrics()
    dropped = Counter(
        "mlmirror_handoff_dropped", "Answered calls a worker could not hand to the hub, by reason.", ["reason"],
        registry=metrics.registry,
    )  # fmt: skip
    sender = HandoffSender(folder / HANDOFF_SOCKET, dropped)
    await sender.connect()
    role = Role("worker", admin="127.0.0.1:0", handoff=sender, feedback_target=f"unix:{folder / FEEDBACK_SOCKET}")
    proxy = Proxy(config, metrics=metrics, role=role)
    await proxy.start()
    sender.hello(index=index, pid=os.getpid(), admin_port=proxy.admin_port, grpc_port=proxy.grpc_port)

    async def stop_when_the_hub_goes() -> None:
        await sender.hub_gone()
        log.error("worker %d: the hub went away; stopping", index)
        await proxy.stop()
        shutil.rmtree(folder, ignore_errors=True)  # the supervisor died: nobody else will remove its sockets

    watcher = asyncio.get_running_loop().create_task(stop_when_the_hub_goes())
    try:
        await proxy.run_until_signalled()
    finally:
        watcher.cancel()
        await sender.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor, not by hand)."""
    from mlmirror.eventloop import run

    parser = argparse.ArgumentParser(
        prog="python -m mlmirror.runtime.workers", description="an mlmirror worker process"
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True, help="the supervisor's socket folder")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s worker {args.index} %(levelname)s "
                        "%(name)s: %(message)s")  # fmt: skip
    try:
        run(run_worker(args.config, args.index, args.folder), use_uvloop=not args.no_uvloop)
    except (StartError, OSError) as exc:
        log.error("worker %d cannot start: %s", args.index, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

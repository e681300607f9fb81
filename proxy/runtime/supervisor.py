"""``mlmirror serve``: a supervisor, N serving workers (default 1) and one observing process.

The supervisor serves the admin endpoint and keeps its children alive (proxy/runtime/children.py). The workers
(proxy/runtime/workers.py) share the listener's port and relay calls; the observing process
(proxy/runtime/observer_process.py), at a lower CPU priority, makes the shadow copies, measures drift, joins ground
truth and captures. Serving never waits for observing: a dead, hung or restarting observer costs the workers
counted hand-off drops, never a call, and the supervisor starts it again.

The admin endpoint merges: ``/metrics`` is the children's expositions merged (proxy/admin/metrics_merge.py);
``/status`` is the observer's (shadows, drift, ground truth) with the workers' call counts summed in, a ``workers``
list and an ``observer`` entry; ``/readyz`` is ready when every worker is (the observer is not needed to serve);
``/reload`` and ``/promote`` act on the observer, then on every worker; ``/outcomes`` goes to the observer. A
promotion is kept by the supervisor until the next reload, and a child that restarts starts with it
(``--promote``), so every process serves the same primary from its first call. SIGTERM or SIGINT stops the
workers first (each drains its calls, for the current config's ``shutdown_grace``), then the observer; a second one
kills the children and exits 1. SIGHUP reloads.

Each worker stops as a lone proxy does (proxy/runtime/proxy.py): not ready at once (and the supervisor's ``/readyz``
503), still serving for ``shutdown_delay``, then it stops accepting and drains for ``shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

from mlmirror.admin.dashboard import admin_server, agreement_thresholds
from mlmirror.admin.http import AdminServer, Request, Response
from mlmirror.admin.metrics_merge import merge_expositions
from mlmirror.config import Config, load_config
from mlmirror.errors import ConfigError, StartError
from mlmirror.observing.groundtruth.access import FeedbackGate, rejection_counter
from mlmirror.observing.shadows.promotion import PromotionError, UnknownNameError
from mlmirror.runtime.children import Child
from mlmirror.runtime.proxy import admin_token
from mlmirror.runtime.signals import serve_until_stopped
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 60.0  # seconds for every child to start and say hello
_READ_TIMEOUT = 5.0  # seconds for a child's /metrics or /status: a hung observer must not hang the admin endpoint
_LOST_ON_RESTART = (
    "shadow verdict windows, drift windows and predictions awaiting ground truth since the observer's last start"
)


class Supervisor:
    """Runs the admin endpoint and keeps ``count`` serving workers and one observing process alive."""

    def __init__(self, config_path: str, count: int, *, use_uvloop: bool = True, log_level: str = "info") -> None:
        self.config_path = str(Path(config_path).resolve())
        self.count = count
        self.config: Config = load_config(self.config_path)  # first: a bad file leaves nothing behind
        self.folder = Path(tempfile.mkdtemp(prefix="mlmirror-"))  # mode 0700: only this user reaches the sockets
        common = ["--config", self.config_path, "--folder", str(self.folder), "--log-level", log_level,
                  *([] if use_uvloop else ["--no-uvloop"])]  # fmt: skip
        self.observer = Child("observer", 0, "mlmirror.runtime.observer_process", common,
                              more_args=self._promotion_args)  # fmt: skip
        self.workers = [Child("worker", i, "mlmirror.runtime.workers", [*common, "--index", str(i)],
                              more_args=self._promotion_args) for i in range(count)]  # fmt: skip
        self.registry = CollectorRegistry()  # the supervisor's own few metrics; the children export the rest
        self._restarts = Counter(
            "mlmirror_worker_restarts", "Child processes started again after they exited (worker: index or observer).",
            ["worker"], registry=self.registry,
        )  # fmt: skip
        Gauge("mlmirror_workers", "Serving worker processes running now.", registry=self.registry).set_function(
            lambda: sum(1 for w in self.workers if w.running)
        )
        Gauge("mlmirror_observer_up", "1 while the observing process runs and answers, else 0.",
              registry=self.registry).set_function(lambda: 1 if self.observer.up else 0)  # fmt: skip
        self._token = admin_token(self.config)
        self._outcomes = None if self.config.admin is None else FeedbackGate.for_admin(
            self.config, self.config.admin, self._token, rejection_counter(self.registry)
        )  # fmt: skip
        self._promotions: list[tuple[str, str]] = []  # applied since the last reload, in order
        self._admin: AdminServer | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def children(self) -> list[Child]:
        return [self.observer, *self.workers]

    # --- start and stop -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the observer, then the workers (waiting until each has said hello), then the admin endpoint."""
        try:
            await self._start_children([self.observer])
            await self._start_children(self.workers)
            if self.config.admin is not None:
                self._admin = admin_server(self.config.admin, self, PromotionError, token=self._token,
                                           thresholds=lambda: agreement_thresholds(self.config))  # fmt: skip
                try:
                    await self._admin.start()
                except OSError as exc:
                    self._admin = None
                    raise StartError(f"cannot serve the admin endpoint on {self.config.admin}: {exc}") from None
        except BaseException:
            await self.stop()
            raise
        log.info("mlmirror: %d serving workers on %s, one observing process (nice %d); admin on %s", self.count,
                 self.config.listen, self.config.observer.nice,
                 f"http://{self.config.admin}" if self.config.admin else "(disabled)")  # fmt: skip

    async def _start_children(self, children: list[Child]) -> None:
        for child in children:
            child.spawn()
        failures = await asyncio.gather(*(child.wait_started(_START_TIMEOUT) for child in children))
        failed = [failure for failure in failures if failure is not None]
        if failed:
            raise StartError("; ".join(dict.fromkeys(failed)))
        for child in children:
            self._background(child.watch(lambda: self._stopping, self._restarted))

    def _promotion_args(self) -> list[str]:
        """``--promote ROUTE SHADOW`` for each promotion made since the config file was read, in order."""
        return [arg for route, shadow in self._promotions for arg in ("--promote", route, shadow)]

    async def _restarted(self, child: Child) -> None:
        """A child is back (with the promotions the others serve: it started with them)."""
        self._restarts.labels("observer" if child.kind == "observer" else str(child.index)).inc()

    def _background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """SIGTERM every worker and wait for them to stop (``shutdown_delay`` plus ``shutdown_grace`` plus 5 s), then
        the observer (no delay: it serves no client)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.shutdown_grace + 5.0
        await _terminate([w for w in self.workers if w.running], self.config.shutdown_delay + grace)
        await _terminate([self.observer] if self.observer.running else [], grace)
        for child in self.children:
            child.close()
        current = asyncio.current_task()  # stop() itself may run as one of the background tasks
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._admin is not None:
            await self._admin.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT (the ordered stop; a second one kills the children and exits at once);
        SIGHUP reloads."""

        def kill_children() -> None:
            for child in self.children:
                if child.running:
                    assert child.process is not None
                    child.process.kill()
            shutil.rmtree(self.folder, ignore_errors=True)

        await serve_until_stopped(
            self._stopped, stop=lambda: self._background(self.stop()), reload=lambda: self._background(self.reload()),
            before_exit=kill_children, stopping="stopping the workers, then the observer",
        )  # fmt: skip

    # --- what the admin endpoints ask (proxy/admin/endpoints.py) -------------------------------------------------

    async def _ask_workers(self, method: str, path: str) -> list[tuple[int, bytes]]:
        return list(await asyncio.gather(*(w.ask(method, path, self._token) for w in self.workers)))

    async def exposition(self) -> tuple[bytes, str]:
        """The children's expositions merged (proxy/admin/metrics_merge.py)."""
        observer, *workers = await asyncio.gather(
            *(c.ask("GET", "/metrics", self._token, timeout=_READ_TIMEOUT) for c in self.children)
        )
        texts = {str(w.index): body.decode() for w, (code, body) in zip(self.workers, workers, strict=True)
                 if code == 200}  # fmt: skip
        texts["supervisor"] = generate_latest(self.registry).decode()
        hub = observer[1].decode() if observer[0] == 200 else ""
        return merge_expositions(hub, texts), "text/plain; version=0.0.4; charset=utf-8"

    async def ready_report(self) -> tuple[bool, list[str]]:
        """Ready when every worker is (the observer is not needed to serve); one line per child."""
        answers = await self._ask_workers("GET", "/readyz")
        ready = not self._stopping and all(code == 200 for code, _ in answers)
        lines = [f"worker {w.index}: " + (body.decode().strip().replace("\n", "; ") or f"status {code}")
                 for w, (code, body) in zip(self.workers, answers, strict=True)]  # fmt: skip
        lines.append("observer: " + ("up" if self.observer.up else "down (serving goes on; it is being restarted)"))
        return ready, lines

    async def status(self) -> dict:
        """The observer's status (shadows, drift) with the workers' call counts summed in, the workers listed and
        the observer's state (up, restarts, what a restart loses)."""
        (code, body), *answers = await asyncio.gather(
            *(c.ask("GET", "/status", self._token, timeout=_READ_TIMEOUT) for c in self.children)
        )
        own = [_json_state(status, text) for status, text in answers]
        status = _json_state(code, body)
        if code == 200 and status is None:
            code, body = 0, b"its status was not JSON"
        if status is None:  # the observer cannot say: the routes and upstreams as a worker sees them
            status = next((s for s in own if s is not None), None)
        if status is None:
            status = {"routes": [], "upstreams": {}}
        calls: dict[str, dict[str, int]]  # route -> code -> calls, summed over the workers
        requests: dict[str, dict[str, int]]  # upstream -> code -> requests
        workers, calls, requests, inflight, ready = [], {}, {}, 0, True
        if "envoy_tap" in status:  # the observer reads the calls from Envoy's tap itself: its counts come first
            calls = {route["name"]: dict(route["calls"]) for route in status["routes"]}
            requests = {name: dict(upstream["requests"]) for name, upstream in status["upstreams"].items()}
        for worker, state, (_, text) in zip(self.workers, own, answers, strict=True):
            entry: dict[str, object] = {"index": worker.index, "pid": worker.pid, "restarts": worker.restarts}
            if state is not None:
                served = sum(sum(route["calls"].values()) for route in state["routes"])
                entry.update(ready=state["ready"], inflight_calls=state["inflight_calls"], calls=served)
                inflight += state["inflight_calls"]
                ready = ready and state["ready"]
                for route in state["routes"]:
                    _add(calls.setdefault(route["name"], {}), route["calls"])
                for name, upstream in state["upstreams"].items():
                    _add(requests.setdefault(name, {}), upstream["requests"])
            else:
                entry.update(ready=False, error=text.decode(errors="replace"))
                ready = False
            workers.append(entry)
        for route in status["routes"]:
            route["calls"] = dict(sorted(calls.get(route["name"], {}).items()))
        for name, upstream in status["upstreams"].items():
            upstream["requests"] = dict(sorted(requests.get(name, {}).items()))
        status.update(ready=ready and not self._stopping, inflight_calls=inflight, workers=workers)
        status["observer"] = {
            "up": code == 200 and self.observer.up, "pid": self.observer.pid, "restarts": self.observer.restarts,
            "nice": self.config.observer.nice, "scheduling": self.config.observer.scheduling,
            "lost_on_restart": _LOST_ON_RESTART, "intake": status.pop("intake", None),
            **({} if code == 200 else {"error": body.decode(errors="replace")}),
        }  # fmt: skip
        status["listen"] = {"grpc": self.config.listen, "admin": self.config.admin, "workers": self.count}
        return status

    async def status_report(self) -> dict[str, object]:
        return await self.status()

    async def reload(self) -> tuple[bool, list[str]]:
        """Reload the observer from the config file, then every worker; (all took it, what each said). A file the
        observer rejects (it logs why and counts the failure) changes nothing anywhere."""
        code, body = await self.observer.ask("POST", "/reload", self._token)
        lines = [f"observer: {code} {body.decode(errors='replace').strip()}"]
        if code not in (0, 200):
            return False, [*lines, "rejected: nothing changed"]
        try:
            config = load_config(self.config_path)  # the observer is down (or the file changed since): check here
        except ConfigError as exc:
            log.error("config reload rejected, keeping the current config: %s", exc)
            return False, [*lines, f"rejected: {exc}; nothing changed"]
        answers = await self._ask_workers("POST", "/reload")
        lines += [f"worker {w.index}: {code} {body.decode().strip()}"
                  for w, (code, body) in zip(self.workers, answers, strict=True)]  # fmt: skip
        ok = all(code == 200 for code, _ in answers)
        if ok:
            self.config, self._token, self._promotions = config, admin_token(config), []
        return ok, lines

    async def reload_report(self) -> tuple[bool, str]:
        ok, lines = await self.reload()
        return ok, "\n".join(["reloaded" if ok else "reload incomplete", *lines])

    async def promote(self, route: str, shadow: str, *, force: bool = False) -> str:
        """Promote in the observer (which holds the verdict), then force the same promotion in every worker."""
        path = _promote_path(route, shadow, force=force)
        code, body = await self.observer.ask("POST", path, self._token)
        text = body.decode(errors="replace").strip()
        if code != 200:
            if code == 0:
                raise PromotionError(f"the observing process cannot answer ({text}); try again when it is back")
            refused = UnknownNameError if code == 404 else PromotionError
            raise refused(text.removeprefix("not promoted: "))
        answers = await self._ask_workers("POST", _promote_path(route, shadow))
        failed = [f"worker {w.index}: {code} {body.decode().strip()}"
                  for w, (code, body) in zip(self.workers, answers, strict=True) if code != 200]  # fmt: skip
        self._promotions.append((route, shadow))
        if failed:
            raise PromotionError("; ".join([f"{text}, but not in every worker", *failed]))
        return text

    async def outcomes(self, request: Request) -> Response:
        """Ground truth lives in the observing process: the request goes there as it came (once its credentials,
        the admin or the feedback token, are checked here)."""
        refused = self._outcomes.refuse_http(request.headers) if self._outcomes is not None else None
        if refused is not None:
            return Response.text(refused[1], refused[0])
        code, body = await self.observer.ask("POST", "/outcomes", self._token, request.body)
        if code == 0:
            return Response.text(f"the observing process cannot take outcomes now: {body.decode()}", 503)
        return Response(code, body, "application/json" if code == 200 else "text/plain; charset=utf-8")


def _promote_path(route: str, shadow: str, *, force: bool = True) -> str:
    query = {"route": route, "shadow": shadow, **({"force": "1"} if force else {})}
    return "/promote?" + urllib.parse.urlencode(query)


async def _terminate(children: list[Child], grace: float) -> None:
    """SIGTERM ``children`` and wait up to ``grace`` seconds for them to exit; kill those still running then."""
    for child in children:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        process = child.process
        assert process is not None
        try:
            await asyncio.to_thread(process.wait, max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in time; killing it", child.name, process.pid)
            process.kill()
            await asyncio.to_thread(process.wait)


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


def _json_state(code: int, body: bytes) -> dict | None:
    """A child's /status answer as a dict; None when it did not answer 200 with a JSON object."""
    if code != 200:
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None

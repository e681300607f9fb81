"""The supervisor's children: serving workers and the observing process, each a ``python -m`` subprocess.

Two pipes tie a child to the supervisor. On the **hello** pipe the child writes one JSON line once it serves
(its pid and internal admin port); the supervisor waits for it at start and after every restart. The **lifeline**
is a pipe the supervisor holds open and never writes: when the supervisor dies, however it dies, the child reads
end-of-file and stops by itself. A child that exits is started again after ``RESTART_BACKOFF[0]`` seconds,
doubling to ``RESTART_BACKOFF[1]`` while it keeps failing within a minute of its start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlmirror.errors import ConfigError, StartError
from mlmirror.eventloop import run
from mlmirror.runtime.promotion import add_promote_argument

__all__ = [
    "RESTART_BACKOFF", "Child", "announce", "child_parser", "lifeline_closed", "parse_answer", "run_child",
    "serve_child",
]  # fmt: skip

log = logging.getLogger(__name__)

RESTART_BACKOFF = (1.0, 30.0)  # seconds: first delay, cap
_ANSWER_TIMEOUT = 30.0  # seconds for a child's admin endpoint to answer (a reload may take a while)


@dataclass
class Child:
    """One child process as the supervisor sees it: ``kind`` is ``worker`` or ``observer``."""

    kind: str
    index: int
    module: str
    args: Sequence[str]
    process: subprocess.Popen | None = None
    admin_port: int | None = None
    pid: int | None = None
    restarts: int = 0
    started: float = 0.0
    greeted: asyncio.Event = field(default_factory=asyncio.Event)
    #: arguments decided at each start (after ``args``): say, the promotions the other processes serve
    more_args: Callable[[], Sequence[str]] = lambda: ()
    failure: str | None = None  # why the child stopped before it served (its own words, or its exit)
    _lifeline: int | None = None

    @property
    def name(self) -> str:
        return "observer" if self.kind == "observer" else f"worker {self.index}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def up(self) -> bool:
        """Running and it has said hello (its admin endpoint answers)."""
        return self.running and self.greeted.is_set() and self.failure is None

    def spawn(self) -> None:
        """Start the process with its hello pipe and lifeline; ``greeted`` is set when it says hello."""
        self.greeted.clear()
        self.admin_port = None
        self.failure = None
        hello_read, hello_write = os.pipe()
        life_read, life_write = os.pipe()
        os.set_inheritable(hello_write, True)
        os.set_inheritable(life_read, True)
        # subprocess.Popen, not the event loop's spawn: CPython starts the child with vfork, so gRPC's fork handlers
        # never run in a process full of gRPC threads. New session: a terminal's Ctrl-C reaches the supervisor only,
        # which then stops its children in order.
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args, *self.more_args(),
                 "--hello-fd", str(hello_write), "--lifeline-fd", str(life_read)],
                pass_fds=(hello_write, life_read), start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(hello_write)
            os.close(life_read)
        self._close_lifeline()
        self._lifeline = life_write
        self.pid = self.process.pid
        self.started = time.monotonic()
        asyncio.get_running_loop().create_task(self._read_hello(hello_read))

    async def _read_hello(self, fd: int) -> None:
        try:
            hello = json.loads(await _read_to_end(fd))
        except ValueError:
            hello = None
        if isinstance(hello, dict) and "error" not in hello:
            self.admin_port = hello.get("admin_port")
            self.pid = hello.get("pid", self.pid)
            self.greeted.set()
            return
        self.failure = str(hello["error"]) if isinstance(hello, dict) else f"{self.name} exited before it served"
        self.greeted.set()  # whoever waits for the hello learns of the failure

    async def wait_started(self, timeout: float) -> str | None:  # noqa: ASYNC109
        """Wait until the child serves; None, or why it did not within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.greeted.wait(), timeout)
        except TimeoutError:
            return f"{self.name} did not start within {timeout:g}s (see the log)"
        return self.failure

    async def watch(self, stopping: Callable[[], bool], on_restart: Callable[[Child], Awaitable[None]]) -> None:
        """Start this child again whenever it exits, until ``stopping()``; ``on_restart`` runs once it is back."""
        while True:
            process = self.process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if stopping() or self.process is not process:
                return
            quick = time.monotonic() - self.started < 60.0
            delay = min(RESTART_BACKOFF[0] * 2 ** (self.restarts if quick else 0), RESTART_BACKOFF[1])
            log.error("%s (pid %d) exited with %s; starting it again in %.0fs", self.name, process.pid, code, delay)
            await asyncio.sleep(delay)
            if stopping():
                return
            self.restarts += 1
            self.spawn()
            if await self.wait_started(60.0) is None:
                await on_restart(self)

    def close(self) -> None:
        """Let go of the lifeline (the child then stops by itself, if it still runs)."""
        self._close_lifeline()

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None

    async def ask(
        self,
        method: str,
        path: str,
        token: str | None,
        body: bytes = b"",
        timeout: float = _ANSWER_TIMEOUT,  # noqa: ASYNC109
    ) -> tuple[int, bytes]:
        """(status, body) of one request to the child's internal admin endpoint; (0, reason) when it cannot answer
        within ``timeout`` seconds."""
        if self.admin_port is None or not self.running:
            return 0, b"not running"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.admin_port), 5.0)
        except (OSError, TimeoutError) as exc:
            return 0, str(exc).encode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.kind}\r\nConnection: close\r\n{auth}"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        try:
            writer.write(head.encode() + body)
            answer = await asyncio.wait_for(reader.read(), timeout)
        except (OSError, TimeoutError) as exc:
            return 0, str(exc).encode() or b"no answer in time"
        finally:
            writer.close()
        return parse_answer(answer)


def parse_answer(answer: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer read to its end; (0, reason) when it is malformed or shorter than its
    Content-Length says (a child killed while it wrote)."""
    head, _, content = answer.partition(b"\r\n\r\n")
    status_line, *headers = head.split(b"\r\n")
    try:
        code = int(status_line.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, b"malformed answer"
    for line in headers:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit() and len(content) < int(value):
            return 0, b"answer cut short (%d of %d bytes)" % (len(content), int(value))
    return code, content


async def _read_to_end(fd: int, limit: int = 65536) -> bytes:
    """What is written to pipe ``fd`` until its writer closes it (at most ``limit`` bytes), read by the event loop
    (no thread: a blocked reading thread would hold the process open at exit); then ``fd`` is closed."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    data = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        data.extend(chunk)
        if (not chunk or len(data) >= limit) and not done.done():
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(data)


def announce(hello_fd: int, **facts: object) -> None:
    """A child's hello: one JSON line to the supervisor (who then talks to its admin endpoint); closes the pipe.
    ``error=REASON`` instead says why it cannot start. Only the first call writes."""
    if hello_fd in _announced:
        return
    _announced.add(hello_fd)
    with contextlib.suppress(OSError), os.fdopen(hello_fd, "wb", buffering=0) as pipe:  # a dead supervisor: EPIPE
        pipe.write(json.dumps(facts).encode() + b"\n")


_announced: set[int] = set()  # hello pipes written (and closed) by this process


async def lifeline_closed(fd: int) -> None:
    """Return when the supervisor lets go of the lifeline (it stopped us, or it died)."""
    await _read_to_end(fd)


async def serve_child(
    name: str,
    serve: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    lifeline_fd: int,
    folder: Path,
    cleanup: Callable[[], Awaitable[None]],
) -> None:
    """Run ``serve`` (until a signal) in child ``name``; when the supervisor goes away (the lifeline closes),
    ``stop`` it. ``cleanup`` runs either way; an orphan then removes the socket folder, as nobody else is left to."""
    orphaned = asyncio.Event()

    async def stop_when_the_supervisor_goes() -> None:
        await lifeline_closed(lifeline_fd)
        log.error("%s: the supervisor went away; stopping", name)
        orphaned.set()
        await stop()

    watcher = asyncio.get_running_loop().create_task(stop_when_the_supervisor_goes())
    try:
        await serve()
    finally:
        watcher.cancel()
        await cleanup()
        if orphaned.is_set():
            shutil.rmtree(folder, ignore_errors=True)


def child_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The command line every child takes from the supervisor (``python -m MODULE``): its config, the socket folder,
    its two pipes, the promotions to start with, log level and event loop."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--folder", type=Path, required=True, help="the supervisor's socket folder")
    parser.add_argument("--hello-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    add_promote_argument(parser)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-uvloop", action="store_true")
    return parser


def run_child(name: str, args: argparse.Namespace, main: Coroutine[Any, Any, None]) -> int:
    """Run a child's ``main`` with its logging (lines say ``name``); a child that cannot start logs why and tells the
    supervisor on its hello pipe. Returns the exit code."""
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    try:
        run(main, use_uvloop=not args.no_uvloop)
    except (StartError, ConfigError, OSError) as exc:
        log.error("%s cannot start: %s", name, exc)
        announce(args.hello_fd, error=str(exc))
        return 1
    return 0

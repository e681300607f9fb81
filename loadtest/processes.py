"""Python subprocesses for benchmarks (model servers, proxies), run from the repository and stopped on exit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["REPO", "lowered", "python_process", "stop_process"]

REPO = Path(__file__).resolve().parent.parent
AUTOGROUP = Path("/proc/self/autogroup")


def lowered(nice: int, own_group: bool = True) -> Callable[[], None]:
    """A ``preexec_fn`` that lowers a child to CPU priority ``nice``. With ``own_group`` the child also gets a
    session of its own whose scheduling group is niced as well: where Linux groups processes by session
    (``kernel.sched_autogroup_enabled``), a niceness only ranks a process within its session's group, so a stand-in
    niced inside the benchmark's session would still compete as an equal with mlmirror's workers, each of which has
    a session of its own. Without ``own_group``: ``os.nice`` alone, in the benchmark's session."""

    def lower() -> None:
        if own_group:
            os.setsid()
        os.nice(nice)
        if own_group and AUTOGROUP.exists():
            AUTOGROUP.write_text(f"{nice}\n")

    return lower


@contextlib.contextmanager
def python_process(
    *args: str, log: Path | None = None, nice: int = 0, own_group: bool = True
) -> Iterator[subprocess.Popen]:
    """``python ARGS`` with the repository as its working directory, at CPU priority ``nice`` (0: this process's,
    in its session; otherwise as ``lowered(nice, own_group)``); its output goes to ``log`` (appended) or nowhere.
    On exit: SIGTERM, then SIGKILL after 10 s."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        lower = lowered(nice, own_group) if nice else None
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=out, preexec_fn=lower)
        try:
            yield process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; always reaped."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

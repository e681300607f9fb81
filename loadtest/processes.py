"""Python subprocesses for benchmarks (model servers, proxies), run from the repository and stopped on exit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REPO", "python_process", "stop_process"]

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def python_process(*args: str, log: Path | None = None, nice: int = 0) -> Iterator[subprocess.Popen]:
    """``python ARGS`` with the repository as its working directory, at CPU priority ``nice`` (0: this process's);
    its output goes to ``log`` (appended) or nowhere. On exit: SIGTERM, then SIGKILL after 10 s."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        lower = (lambda: os.nice(nice)) if nice else None
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

"""Python subprocesses for benchmarks (model servers, proxies), run from the repository and stopped on exit."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REPO", "python_process", "stop_process"]

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def python_process(*args: str, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """``python ARGS`` with the repository as its working directory; its output goes to ``log`` (appended) or
    nowhere. On exit: SIGTERM, then SIGKILL after 10 s."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=out)
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

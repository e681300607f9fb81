"""Driving gRPC with h2load (Debian's nghttp2-client): framed request bodies, runs, and per-call latencies.

h2load speaks HTTP/2 and knows nothing of gRPC, so the request body is a gRPC length-prefixed frame and the
headers are gRPC's. It checks the HTTP status only: callers confirm gRPC statuses some other way (the proxy's
``mlmirror_calls_total``, or a gRPC call before the run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LoadResult", "ProcessCPU", "descendants", "grpc_frame", "run_h2load"]


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message frame: flag byte 0, 4-byte big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class LoadResult:
    """One h2load run. Latencies in microseconds, from h2load's per-request log."""

    calls: int
    failed: int
    seconds: float
    latencies_us: np.ndarray

    @property
    def rate(self) -> float:
        """Completed calls per second."""
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_us, q)) / 1000.0


def run_h2load(
    port: int,
    path: str,
    body: Path,
    *,
    calls: int,
    connections: int = 4,
    streams: int = 1,
    rate: float | None = None,
) -> LoadResult:
    """Send ``calls`` POSTs of ``body`` to ``http://127.0.0.1:port{path}``.

    ``rate`` (calls per second, total) makes the load open-ish: each connection sends at ``rate / connections``;
    without it h2load sends as fast as answers come back (``streams`` in flight per connection).
    """
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load not found: install Debian's nghttp2-client")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls.log"
        command = [
            h2load, "-n", str(calls), "-c", str(connections), "-m", str(streams), "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
        ]  # fmt: skip
        if rate is not None:
            command.append(f"--rps={max(rate / connections, 0.1):.3f}")
        command.append(f"http://127.0.0.1:{port}{path}")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
        finished = re.search(r"finished in ([\d.]+)(m?s)", done.stdout)
        counts = re.search(
            r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", done.stdout
        )
        if finished is None or counts is None:
            raise RuntimeError(f"cannot read h2load's output:\n{done.stdout}")
        seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
        table = np.loadtxt(log, dtype=np.int64, ndmin=2)
    return LoadResult(
        calls=int(counts.group(3)),
        failed=int(counts.group(4)) + int(counts.group(2)) - int(counts.group(3)),
        seconds=seconds,
        latencies_us=table[:, 2].astype(np.float64),
    )


class ProcessCPU:
    """CPU time (user + system, all threads) a process has used, from ``/proc/<pid>/stat``, in seconds; with
    ``tree``, that of its running descendants too (``mlmirror serve`` is a supervisor with children)."""

    _TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self.pid = pid
        self.tree = tree

    def seconds(self) -> float:
        pids = descendants(self.pid) if self.tree else [self.pid]
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it exited in between
            total += int(fields[11]) + int(fields[12])
        return total / self._TICKS


def descendants(pid: int) -> list[int]:
    """``pid`` and every running process below it (from the parent pids in ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child, parent = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(child)
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(parents.get(current, ()))
    return found

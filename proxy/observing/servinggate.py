"""Observing only while serving has time to spare: the observing process waits while every serving worker is busy.

A niceness or ``SCHED_IDLE`` decides who gets a CPU when there are more runnable tasks than CPUs. It does nothing
about an observer running on the other CPU while a worker runs on its own, and on a small machine that co-running
still costs the worker (shared caches and memory, the cores beside it). A saturated worker's event loop never
sleeps. So the observing process reads, every ``interval`` (1 ms), whether each serving worker's event-loop thread
is asleep (``/proc/<pid>/stat`` state other than ``R``, running or runnable), and keeps

    idle = (1 - alpha) * idle + alpha * (1 if some worker is asleep else 0)        alpha = 0.1, about 10 ms

Before it takes the next hand-off batch (and the drift thread its next calls), it waits while ``idle`` is below
``observer.serving_idle``, at most ``longest`` (0.2 s) each time. On a worker with time to spare its loop sleeps
often and nothing waits; on a saturated one the observer waits, its hand-off backs up, and the worker drops what
no longer fits and counts it (``backpressure``). The longest wait keeps a trickle of calls observed even then.

Without ``/proc`` (another OS), or before any worker has said hello, ``idle`` stays 1 and nothing waits. The
samples are taken only while there is something to gate: for ``active`` (0.5 s) after the last ``wait`` (each
hand-off batch read calls it); an idle observer reads nothing. A share whose last sample is older than ``active``
says nothing about serving now: the gate is open then (the drift thread draining its queue after the calls stopped
does not wait on it), and the next ``wait`` starts the share again from 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GateCollector", "ServingGate", "asleep"]

PROC = Path("/proc")


class _Stat:
    """A worker's ``/proc/<pid>/stat``, kept open: each sample is one ``pread``, not a path lookup and an open. A pid
    that exits reads as an error from then on, even if the number is used again."""

    def __init__(self, pid: int, proc: Path) -> None:
        self.fd = os.open(proc / str(pid) / "stat", os.O_RDONLY)

    def asleep(self) -> bool | None:
        """Whether the state (the field after the command's closing parenthesis) is not ``R``; None once gone."""
        try:
            stat = os.pread(self.fd, 512, 0)
        except OSError:
            return None
        fields = stat.rsplit(b")", 1)[-1].split(None, 1)
        return bool(fields) and fields[0] != b"R"

    def close(self) -> None:
        os.close(self.fd)


def asleep(pid: int, proc: Path = PROC) -> bool | None:
    """Whether process ``pid``'s main thread is asleep (its state not ``R``); None when it cannot be read (gone)."""
    try:
        stat = _Stat(pid, proc)
    except OSError:
        return None
    try:
        return stat.asleep()
    finally:
        stat.close()


class ServingGate:
    """``wait``/``wait_sync`` return once some watched worker's loop was asleep for ``threshold`` of the recent
    samples (None: at once, always); ``watch`` adds a worker's pid, and pids that cannot be read are dropped."""

    def __init__(
        self,
        threshold: float | None,
        *,
        interval: float = 0.001,
        alpha: float = 0.1,
        longest: float = 0.2,
        active: float = 0.5,
        proc: Path = PROC,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        self.active = active
        self.alpha = alpha
        self.longest = longest
        self._proc = proc
        self._workers: dict[int, _Stat] = {}
        #: the moving share of samples in which some worker was asleep (1 until there are workers)
        self.idle = 1.0
        #: seconds spent waiting, and waits that ended at ``longest`` rather than on an idle worker
        self.waited = 0.0
        self.timeouts = 0
        #: samples taken (each reads every worker's /proc/<pid>/stat once)
        self.samples = 0
        self._sampled_at = -float("inf")  # monotonic seconds of the last sample
        self._active_until = 0.0  # monotonic seconds: sample until then
        self._wanted: asyncio.Event | None = None  # set by wait(): sample again
        self._task: asyncio.Task[None] | None = None

    def watch(self, pid: int) -> None:
        """Sample worker ``pid`` from now on (a pid that cannot be read is not watched)."""
        if pid not in self._workers:
            with contextlib.suppress(OSError):  # gone already
                self._workers[pid] = _Stat(pid, self._proc)

    @property
    def watched(self) -> list[int]:
        """The pids sampled."""
        return list(self._workers)

    def start(self) -> None:
        """Sample every ``interval`` seconds on the running event loop, from now until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sampling())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    async def _sampling(self) -> None:
        self._wanted = asyncio.Event()
        while True:
            if self.threshold is None or not self._workers:  # off, or no worker yet: look again in 0.1 s
                await asyncio.sleep(0.1)
            elif time.monotonic() >= self._active_until:  # nothing to gate: until the next wait()
                self._wanted.clear()
                await self._wanted.wait()
            else:
                await asyncio.sleep(self.interval)
                self.sample()

    def sample(self) -> None:
        """Read the workers' states once and move ``idle`` (nothing while the gate is off or no worker is known)."""
        if self.threshold is None or not self._workers:
            return
        self.samples += 1
        self._sampled_at = time.monotonic()
        found = False
        for pid, worker in list(self._workers.items()):
            state = worker.asleep()
            if state is None:
                worker.close()
                del self._workers[pid]
            found = found or bool(state)
        if self._workers:
            self.idle += self.alpha * ((1.0 if found else 0.0) - self.idle)
        else:
            self.idle = 1.0

    @property
    def stale(self) -> bool:
        """Whether the last sample is older than ``active`` seconds (or there was none)."""
        return time.monotonic() - self._sampled_at > self.active

    @property
    def open(self) -> bool:
        return self.threshold is None or self.idle >= self.threshold or self.stale

    async def wait(self) -> None:
        """On the event loop: until the gate is open, at most ``longest`` seconds; keeps the samples going for
        ``active`` seconds more; a stale share starts again from 1."""
        if self.stale:
            self.idle = 1.0
        self._active_until = time.monotonic() + self.active
        if self._wanted is not None and not self._wanted.is_set():
            self._wanted.set()
        for _ in self._polls():
            await asyncio.sleep(self.interval)

    def wait_sync(self) -> None:
        """The same, for another thread (the drift engine's); ``idle`` moves on the event loop meanwhile."""
        for _ in self._polls():
            time.sleep(self.interval)

    def _polls(self) -> Iterator[None]:
        """One step per ``interval`` to wait while the gate is closed, for at most ``longest``; counts the wait."""
        if self.open:
            return
        started = time.monotonic()
        try:
            while not self.open:
                if time.monotonic() - started >= self.longest:
                    self.timeouts += 1
                    return
                yield
        finally:
            self.waited += time.monotonic() - started

    def snapshot(self) -> dict[str, object]:
        """For ``/status``: the threshold, the current idle share, seconds waited, waits that timed out."""
        return {"limit": self.threshold, "idle": round(self.idle, 3), "waited_seconds": round(self.waited, 3),
                "timeouts": self.timeouts}  # fmt: skip


class GateCollector(Collector):
    """The gate's figures in ``/metrics``: the idle share, and the seconds and timed-out waits it cost."""

    def __init__(self, gate: ServingGate) -> None:
        self._gate = gate

    def collect(self) -> Iterator[Metric]:
        gate = self._gate
        yield GaugeMetricFamily(
            "mlmirror_observer_serving_idle",
            "Moving share (about 10 ms) of 1 ms samples in which some serving worker's event loop was asleep.",
            value=gate.idle,
        )
        waited = CounterMetricFamily(
            "mlmirror_observer_serving_waits",
            "The observing process's waits for serving to have time to spare (`observer.serving_idle`): `seconds` "
            "waited, `timeouts` (waits that ended at 0.2 s).",
            labels=["count"],
        )
        waited.add_metric(["seconds"], gate.waited)
        waited.add_metric(["timeouts"], gate.timeouts)
        yield waited

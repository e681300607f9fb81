"""What the observing process sheds on: CPU pressure on the machine, and its own CPU time against a budget.

Both are a counter differenced every ``interval`` seconds on the event loop, a rate between two samples:

    rate = (counter(now) - counter(then)) / (now - then)

and the observer drops (and counts) the calls it is handed while ``rate`` is above its ``limit``.

- ``CpuPressure`` (``observer.cpu_pressure_limit``): Linux pressure stall information (PSI). The ``some`` line of
  ``cpu.pressure`` counts the microseconds during which at least one runnable task was kept off every CPU; per cgroup
  (v2) the file is the container's own (``/sys/fs/cgroup/cpu.pressure``: it counts the waits a CPU quota causes too),
  otherwise the whole machine's (``/proc/pressure/cpu``). ``rate = Δ some_total_µs / (10⁶ · Δt_s)``, 0 to 1: when
  tasks wait for a CPU, what the observer would spend on a call is better spent serving. Its own waiting counts too,
  so on a full machine it observes in bursts rather than not at all. Without PSI (another OS, a kernel without it)
  ``rate`` stays None and nothing is shed for pressure.
- ``CpuBudget`` (``observer.cpu_limit``): the CPU time of this process, all its threads
  (``CLOCK_PROCESS_CPUTIME_ID``): ``rate = Δ cpu_s / Δt_s``, in CPUs. Above the limit, the calls handed over are
  dropped until a sample finds the process back under it, so over any few intervals it uses about ``limit`` CPUs
  however much the workers hand it: the CPU a busy machine has left goes to serving, not to an observer that would
  take all it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["PSI_FILES", "CpuBudget", "CpuPressure", "SampledRate", "stall_microseconds"]

log = logging.getLogger(__name__)

PSI_FILES = (Path("/sys/fs/cgroup/cpu.pressure"), Path("/proc/pressure/cpu"))


def stall_microseconds(path: Path) -> int | None:
    """The ``some`` stall counter of a PSI file (µs since boot, or since the cgroup was made); None when the file
    cannot be read or has no such line."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind == "some":
            for name, _, value in (item.partition("=") for item in fields):
                if name == "total" and value.isdigit():
                    return int(value)
    return None


class SampledRate:
    """The growth per second of ``counter`` over the last ``interval`` seconds, sampled on the running event loop;
    ``shedding`` while it is above ``limit`` (None: never). ``counter`` returns None when it cannot be read; a rate is
    clipped to [0, ``ceiling``]."""

    def __init__(
        self,
        limit: float | None,
        counter: Callable[[], float | None],
        *,
        interval: float,
        ceiling: float = float("inf"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.interval = interval
        self._ceiling = ceiling
        self._counter = counter
        self._clock = clock
        self.rate: float | None = None  # the last interval's; None until two samples
        self.shedding = False
        self._last: tuple[float, float] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Sample every ``interval`` seconds from now on. ``limit`` may be changed at any time (a reload)."""
        self.sample()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sample(self) -> None:
        """Read the counter once, update ``rate`` and ``shedding``, and schedule the next sample."""
        now, value = self._clock(), self._counter()
        if value is not None:
            if self._last is not None and now > self._last[0]:
                self.rate = min(max((value - self._last[1]) / (now - self._last[0]), 0.0), self._ceiling)
                self.shedding = self.limit is not None and self.rate > self.limit
            self._last = (now, value)
        self._timer = asyncio.get_running_loop().call_later(self.interval, self.sample)


class CpuPressure(SampledRate):
    """The CPU pressure ratio (0 to 1) of the last ``interval`` seconds, from the first readable of ``sources``."""

    def __init__(
        self,
        limit: float | None,
        *,
        interval: float = 0.25,
        sources: Sequence[Path] = PSI_FILES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = next((path for path in sources if stall_microseconds(path) is not None), None)
        source = self.source

        def stalled_seconds() -> float | None:
            stalled = stall_microseconds(source) if source is not None else None
            return stalled / 1e6 if stalled is not None else None

        super().__init__(limit, stalled_seconds, interval=interval, ceiling=1.0, clock=clock)

    def start(self) -> None:
        """Sample every ``interval`` seconds from now on (nothing to sample without a source)."""
        if self.source is None:
            log.info("no CPU pressure information (%s): the observer sheds only when it falls behind",
                     ", ".join(map(str, PSI_FILES)))  # fmt: skip
            return
        super().start()

    def snapshot(self) -> dict[str, object]:
        """What ``/status`` shows: the source, the limit, the last ratio and whether calls are being shed."""
        return {
            "source": str(self.source) if self.source is not None else None,
            "limit": self.limit,
            "ratio": round(self.rate, 4) if self.rate is not None else None,
            "shedding": self.shedding,
        }


class CpuBudget(SampledRate):
    """This process's CPU use (CPUs: CPU seconds per second, all threads) over the last ``interval`` seconds."""

    def __init__(
        self,
        limit: float | None,
        *,
        interval: float = 0.1,
        cpu_seconds: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(limit, cpu_seconds, interval=interval, clock=clock)

    def snapshot(self) -> dict[str, object]:
        """What ``/status`` shows: the limit (CPUs), the last interval's use (CPUs), and whether calls are shed."""
        return {
            "limit": self.limit,
            "cpus": round(self.rate, 4) if self.rate is not None else None,
            "shedding": self.shedding,
        }

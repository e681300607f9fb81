"""CPU pressure: how much of the last moment some task of this machine (or this container) spent waiting for a CPU.

Linux reports it as pressure stall information (PSI): the ``some`` line of ``cpu.pressure`` counts the
microseconds during which at least one runnable task was kept off every CPU. Per cgroup (v2) that file is the
container's own (``/sys/fs/cgroup/cpu.pressure``: it counts the waits a CPU quota causes too); otherwise the whole
machine's (``/proc/pressure/cpu``). ``CpuPressure`` differences that counter every ``interval`` seconds:

    ratio = (stall_us(now) - stall_us(then)) / (1e6 * (now - then))        (0 to 1)

The observing process sheds the calls it is handed while ``ratio`` is above ``limit``: when tasks wait for a CPU,
what the observer would spend on a call is better spent serving. Its own waiting counts too, so on a full machine
it observes in bursts rather than not at all. Without PSI (another OS, a kernel without it) ``ratio`` stays
None and nothing is shed for pressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["PSI_FILES", "CpuPressure", "stall_microseconds"]

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


class CpuPressure:
    """The CPU pressure ratio of the last ``interval`` seconds, sampled on the running event loop; ``shedding``
    while it is above ``limit`` (None: never)."""

    def __init__(
        self,
        limit: float | None,
        *,
        interval: float = 0.25,
        sources: Sequence[Path] = PSI_FILES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.interval = interval
        self._clock = clock
        self.source = next((path for path in sources if stall_microseconds(path) is not None), None)
        self.ratio: float | None = None  # the last interval's; None until two samples (or without PSI)
        self.shedding = False
        self._last: tuple[float, int] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Sample every ``interval`` seconds from now on (nothing to sample without a source). ``limit`` may be
        changed at any time (a reload)."""
        if self.source is None:
            log.info("no CPU pressure information (%s): the observer sheds only when it falls behind",
                     ", ".join(map(str, PSI_FILES)))  # fmt: skip
            return
        self.sample()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sample(self) -> None:
        """Read the counter once, update ``ratio`` and ``shedding``, and schedule the next sample."""
        assert self.source is not None
        now, stalled = self._clock(), stall_microseconds(self.source)
        if stalled is not None:
            if self._last is not None and now > self._last[0]:
                self.ratio = min(max((stalled - self._last[1]) / (1e6 * (now - self._last[0])), 0.0), 1.0)
                self.shedding = self.limit is not None and self.ratio > self.limit
            self._last = (now, stalled)
        self._timer = asyncio.get_running_loop().call_later(self.interval, self.sample)

    def snapshot(self) -> dict[str, object]:
        """What ``/status`` shows: the source, the limit, the last ratio and whether calls are being shed."""
        return {
            "source": str(self.source) if self.source is not None else None,
            "limit": self.limit,
            "ratio": round(self.ratio, 4) if self.ratio is not None else None,
            "shedding": self.shedding,
        }

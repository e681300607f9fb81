"""How late the event loop runs: the signal to shed mirror work before it costs client calls.

A task sleeps ``interval`` seconds over and over and measures how much later than asked it wakes up. A loop that
wakes late is busy (or starved of CPU); while the last measurement is over ``threshold``, ``overloaded`` is true.
"""

from __future__ import annotations

import asyncio

__all__ = ["LoopLag"]


class LoopLag:
    """Measures event-loop lag (seconds). ``threshold`` None: never report overload."""

    def __init__(self, threshold: float | None, interval: float = 0.02) -> None:
        self.threshold = threshold
        self.interval = interval
        self.lag = 0.0
        self.max_lag = 0.0
        self.overloaded = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._measure())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, loop.time() - asked))

    def observe(self, lag: float) -> None:
        """Record one measurement (seconds late)."""
        self.lag = lag
        self.max_lag = max(self.max_lag, lag)
        self.overloaded = self.threshold is not None and lag > self.threshold

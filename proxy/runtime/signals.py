"""Signals of a serving process: SIGTERM or SIGINT stops it in order, a second one exits at once; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

__all__ = ["serve_until_stopped"]

log = logging.getLogger(__name__)


async def serve_until_stopped(
    stopped: asyncio.Event,
    *,
    stop: Callable[[], None],
    reload: Callable[[], None],
    before_exit: Callable[[], None] = lambda: None,
    stopping: str = "graceful stop",
) -> None:
    """Wait for ``stopped``. The first SIGTERM or SIGINT calls ``stop()`` (which must return at once, say by
    starting a task); a second one logs, calls ``before_exit()`` and exits with status 1 without waiting. SIGHUP
    calls ``reload()``. ``stopping`` says in the log what the first signal does."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s: %s", name, stopping)
            stop()
            return
        log.warning("%s again: exiting without waiting for in-flight calls", name)
        before_exit()
        os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await stopped.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)

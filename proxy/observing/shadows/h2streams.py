"""What an HTTP/2 connection of the h2 transport keeps per call (``Stream``), and the calls waiting for room to start
one (``Waiters``: a free stream under the server's limit, a transport that takes writes again)."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

__all__ = ["Answer", "Headers", "Stream", "Waiters"]

#: a finished call: (the message or None, its code)
Answer = tuple[bytes | None, grpc.StatusCode]
Headers = list[tuple[bytes, bytes]]


class Stream:
    """One call's stream: its answer's future, the answer so far, the request bytes not yet written."""

    __slots__ = ("body", "done", "headers", "id", "pending", "refused", "timer", "window")

    def __init__(self, stream_id: int, done: asyncio.Future[Answer], window: int) -> None:
        self.id = stream_id
        self.done = done
        self.body = bytearray()
        self.headers: Headers | None = None
        #: request bytes not yet written (DATA), None once the last frame is out
        self.pending: memoryview | None = None
        self.window = window  # bytes the server lets this stream send
        self.timer: asyncio.TimerHandle | None = None
        self.refused = False  # reset with REFUSED_STREAM: the server did not process it


class Waiters:
    """Calls waiting for room, each until its deadline, woken in the order they came. A wake-up that reaches a call
    whose deadline passed or that was cancelled in the meantime goes on to the next one, so none is lost."""

    def __init__(self) -> None:
        self._queue: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    async def wait(self, deadline: float) -> bool:
        """Until woken (True) or the loop time ``deadline`` (False)."""
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            self._pass_on(waiter)
            return False
        except asyncio.CancelledError:
            self._pass_on(waiter)
            raise
        return True

    def _pass_on(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():  # woken, but it will not use the room
            self.wake_one()

    def wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)

"""A client's request stream, read once and replayable to a fallback upstream while it fits in a byte budget.

A background task reads the client's messages. While the total stays within ``limit`` bytes every message is kept,
so a failed upstream call can be retried on the next upstream from the first message. Past the limit the stream is
no longer replayable: messages are dropped as soon as the current upstream call has taken them, and reading from
the client pauses while more than ``limit`` bytes wait unsent, so memory stays bounded whatever the client sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

__all__ = ["RequestReplay"]


class RequestReplay:
    """Buffers ``source`` for one consumer at a time; see the module docstring."""

    def __init__(self, source: AsyncIterator[bytes], limit: int) -> None:
        self._limit = limit
        self._messages: list[bytes] = []
        self._first = 0  # absolute index of self._messages[0]
        self._total_bytes = 0
        self._waiting_bytes = 0  # bytes read from the client and not yet taken by the consumer
        self.replayable = True
        self.error: BaseException | None = None
        self._done = False
        self._arrived = asyncio.Event()
        self._taken_event = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read(source))

    async def _read(self, source: AsyncIterator[bytes]) -> None:
        try:
            async for message in source:
                self._messages.append(message)
                self._total_bytes += len(message)
                self._waiting_bytes += len(message)
                if self._total_bytes > self._limit:
                    self.replayable = False
                self._arrived.set()
                while self._waiting_bytes > self._limit:
                    self._taken_event.clear()
                    await self._taken_event.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's stream broke; the consumer sees the end of the stream
            self.error = exc
        finally:
            self._done = True
            self._arrived.set()

    async def messages(self) -> AsyncIterator[bytes]:
        """Yield the stream from its first message. Only one consumer may read at a time; a new one may start only
        while ``replayable`` is True."""
        if self._first != 0:
            raise RuntimeError("the request stream is no longer replayable")
        index = 0
        self._waiting_bytes = self._total_bytes
        while True:
            while index - self._first < len(self._messages):
                message = self._messages[index - self._first]
                index += 1
                self._waiting_bytes -= len(message)
                if not self.replayable:
                    del self._messages[: index - self._first]
                    self._first = index
                self._taken_event.set()
                yield message
            if self._done:
                return
            self._arrived.clear()
            await self._arrived.wait()

    def close(self) -> None:
        """Stop reading from the client (the call is over)."""
        self._reader.cancel()

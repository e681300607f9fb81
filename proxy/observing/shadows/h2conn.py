"""One client HTTP/2 connection carrying unary gRPC calls (RFC 9113; gRPC's PROTOCOL-HTTP2.md), for shadow copies.

Frames written during one event-loop pass go out in one ``write``. Flow control: answers get a stream window as
large as the largest message accepted (so no stream ever needs a WINDOW_UPDATE) and the connection a 1 GiB one,
acknowledged at half; requests wait for the server's windows, cut to its frame size. Keepalive as the upstream's
grpc channel has it: while calls are open and nothing arrived for ``keepalive.time`` seconds, a PING; no frame
within ``keepalive.timeout`` after it closes the connection (its calls end ``UNAVAILABLE``).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections import deque
from typing import cast

import grpc
import hpack
from mlmirror.observing.shadows import h2wire as w
from mlmirror.observing.shadows.h2streams import Answer, Headers, Stream, Waiters

__all__ = ["H2Connection"]


_MAX_STREAM_ID = 2**31 - 1
_CONNECTION_WINDOW = 2**30  # bytes the server may send before an acknowledgement, beyond HTTP/2's initial 65535
_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE this client accepts (HTTP/2's default)
_REFUSED_RETRIES = 5  # times a call the server refused is sent again
_DECODED_CACHE = 256  # distinct header blocks remembered decoded
_MAX_HEADER_BLOCK = 256 * 1024  # bytes of one header block with its CONTINUATIONs
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_INTERNAL = grpc.StatusCode.INTERNAL


class H2Connection(asyncio.Protocol):
    """A connection to one server; ``unary`` sends a call on it. Lost or drained, it takes no new calls."""

    def __init__(
        self, authority: str, scheme: str, max_message_size: int, user_agent: str, keepalive: tuple[float, float]
    ) -> None:
        self._authority, self._scheme, self._user_agent = authority, scheme, user_agent
        self._keepalive = keepalive  # seconds: (idle before a PING, its answer's limit)
        self._received_at = 0.0  # loop time of the last bytes received
        self._pinged_at: float | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._max_body = max_message_size + 5  # the gRPC prefix, then the message
        self.transport: asyncio.Transport | None = None
        self._blocks: dict[tuple[str, float], bytes] = {}
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self._decoder = hpack.Decoder()
        self._decoded: dict[bytes, Headers] = {}
        self._buffer = bytearray()
        self._continuing: tuple[int, bytearray, bool] | None = None  # a header block awaiting CONTINUATION
        self._out: list[bytes] = []
        self._flushing = False
        self._send_window = 65535  # bytes the server lets this connection send
        self._peer_window = 65535  # the server's initial stream window
        self._peer_frame = 16384
        self._server_streams: float = math.inf  # the server's SETTINGS_MAX_CONCURRENT_STREAMS
        self._peer_streams: float = math.inf  # streams this connection opens at most (lower for 1 s after a refusal)
        self._restoring: asyncio.TimerHandle | None = None
        self._blocked: deque[Stream] = deque()
        self._slots = Waiters()  # calls waiting for a stream under the limit
        self._writable = Waiters()  # calls waiting for the transport to take writes again
        self._paused = False
        self._unacked = 0
        self._draining = False
        self._lost = False
        #: whether the server has sent its SETTINGS (a connection that closes before counts as a failed connect)
        self.heard = False

    @property
    def usable(self) -> bool:
        """Whether new calls may start here (not lost, not drained by a GOAWAY or a replacement, ids left)."""
        return not (self._lost or self._draining) and self._next_id < _MAX_STREAM_ID - 2

    # the connection's life

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport's
        window = min(_MAX_STREAM_ID, self._max_body + _MAX_FRAME)
        settings = struct.pack(">HIHI", 0x2, 0, 0x4, window)  # ENABLE_PUSH 0, INITIAL_WINDOW_SIZE
        update = struct.pack(">I", _CONNECTION_WINDOW)
        self.transport.write(w.PREFACE + w.frame(w.SETTINGS, 0, 0, settings) + w.frame(w.WINDOW_UPDATE, 0, 0, update))
        loop = asyncio.get_running_loop()
        self._received_at = loop.time()
        self._ticker = loop.call_later(min(self._keepalive), self._tick)

    def _tick(self) -> None:
        """Keepalive: ping an idle connection with calls open; close one whose ping went unanswered."""
        if self._lost:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle, limit = self._keepalive
        if self._pinged_at is not None and self._received_at < self._pinged_at:
            if now - self._pinged_at >= limit:
                self.close()
                return
        elif self._streams and now - self._received_at >= idle:
            self._pinged_at = now
            self._write(w.frame(w.PING, 0, 0, bytes(8)))
        else:
            self._pinged_at = None
        self._ticker = loop.call_later(min(idle, limit) / 2, self._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._fail_all(_UNAVAILABLE)

    def close(self) -> None:
        """Close now: calls in flight end ``UNAVAILABLE``."""
        self._lost = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._fail_all(_UNAVAILABLE)
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Take no new calls (those waiting end ``UNAVAILABLE``); close once the calls in flight have ended."""
        self._draining = True
        self._slots.wake_all()
        self._writable.wake_all()
        if not self._streams and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self._paused = True  # the transport's buffer is full: new calls wait (a server that stops reading)

    def resume_writing(self) -> None:
        self._paused = False
        self._writable.wake_all()

    def _fail_all(self, code: grpc.StatusCode) -> None:
        for stream in list(self._streams.values()):
            self._end(stream, None, code)
        self._slots.wake_all()
        self._writable.wake_all()

    # sending

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    async def unary(
        self, method: str, request: bytes, metadata: tuple[tuple[str, str | bytes], ...], seconds: float
    ) -> Answer:
        """One call: (the answer or None, its code). Ends ``DEADLINE_EXCEEDED`` after ``seconds``.

        A stream the server refused (``REFUSED_STREAM``: it did not process it) is sent again after 10 ms, 20 ms ...
        (five times at most), and this connection then keeps fewer streams open than the server's limit: a grpc
        server counts a stream against its limit a little after the stream has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for attempt in range(_REFUSED_RETRIES + 1):
            stream = await self._stream(deadline)
            if stream is None:
                return None, grpc.StatusCode.DEADLINE_EXCEEDED if self.usable else _UNAVAILABLE
            answer = await self._call(stream, method, request, metadata, deadline - loop.time())
            if not stream.refused or attempt == _REFUSED_RETRIES:
                break
            self._refused()
            await asyncio.sleep(min(0.01 * 2**attempt, max(0.0, deadline - loop.time())))
        return answer

    async def _stream(self, deadline: float) -> Stream | None:
        """A new stream once the server's stream limit and the transport allow; None when the deadline passed or
        the connection went."""
        loop = asyncio.get_running_loop()
        while self.usable and (self._paused or len(self._streams) >= self._peer_streams):
            if not await (self._writable if self._paused else self._slots).wait(deadline):
                return None
        if not self.usable or loop.time() >= deadline:
            return None
        stream = Stream(self._next_id, loop.create_future(), self._peer_window)
        self._next_id += 2
        self._streams[stream.id] = stream
        return stream

    def _refused(self) -> None:
        """A stream was refused: for 1 s, open no more streams than are open now (at least one)."""
        self._peer_streams = max(1, min(self._peer_streams, len(self._streams)))
        if self._restoring is None:
            self._restoring = asyncio.get_running_loop().call_later(1.0, self._restore)

    def _restore(self) -> None:
        self._restoring = None
        self._peer_streams = self._server_streams
        self._slots.wake_all()

    async def _call(
        self, stream: Stream, method: str, request: bytes, metadata: tuple[tuple[str, str | bytes], ...],
        seconds: float,
    ) -> Answer:  # fmt: skip
        self._write_headers(stream.id, self._block(method, seconds) + w.metadata_block(metadata))
        stream.pending = memoryview(b"\x00" + struct.pack(">I", len(request)) + request)
        self._send(stream)
        stream.timer = asyncio.get_running_loop().call_later(seconds, self._expire, stream)
        try:
            return await stream.done
        except asyncio.CancelledError:
            if stream.id in self._streams:
                self._write(w.frame(w.RST_STREAM, 0, stream.id, struct.pack(">I", w.CANCEL)))
                self._end(stream, None, grpc.StatusCode.CANCELLED)
            raise

    def _block(self, method: str, seconds: float) -> bytes:
        key = (method, math.ceil(seconds * 10) / 10)  # grpc-timeout to 0.1 s: a few blocks per method
        block = self._blocks.get(key)
        if block is None:
            if len(self._blocks) >= 4096:  # method names come from clients: never let them grow this cache unbounded
                self._blocks.clear()
            block = self._blocks[key] = w.request_block(method, self._authority, self._scheme, key[1],
                                                        self._user_agent)  # fmt: skip
        return block

    def _write_headers(self, stream_id: int, block: bytes) -> None:
        size = self._peer_frame
        if len(block) <= size:
            self._write(w.frame(w.HEADERS, w.END_HEADERS, stream_id, block))
            return
        self._write(w.frame(w.HEADERS, 0, stream_id, block[:size]))
        for at in range(size, len(block), size):
            last = at + size >= len(block)
            self._write(w.frame(w.CONTINUATION, w.END_HEADERS if last else 0, stream_id, block[at : at + size]))

    def _send(self, stream: Stream) -> None:
        """Write what the windows allow of ``stream``'s request; the rest waits for a WINDOW_UPDATE."""
        pending = stream.pending
        while pending is not None:
            allowed = min(stream.window, self._send_window, self._peer_frame)
            if allowed <= 0:
                if stream not in self._blocked:
                    self._blocked.append(stream)
                break
            chunk, pending = pending[:allowed], pending[allowed:]
            last = not pending
            self._write(w.frame(w.DATA, w.END_STREAM if last else 0, stream.id, bytes(chunk)))
            stream.window -= len(chunk)
            self._send_window -= len(chunk)
            if last:
                pending = None
        stream.pending = pending

    def _resume(self) -> None:
        for _ in range(len(self._blocked)):
            stream = self._blocked.popleft()
            if stream.id in self._streams:
                self._send(stream)

    def _expire(self, stream: Stream) -> None:
        if stream.id in self._streams:
            self._write(w.frame(w.RST_STREAM, 0, stream.id, struct.pack(">I", w.CANCEL)))
            self._end(stream, None, grpc.StatusCode.DEADLINE_EXCEEDED)

    def _end(self, stream: Stream, answer: bytes | None, code: grpc.StatusCode) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        if stream.timer is not None:
            stream.timer.cancel()
        if stream.pending is not None and stream in self._blocked:
            self._blocked.remove(stream)
        if not stream.done.done():
            stream.done.set_result((answer, code))
        self._slots.wake_one()
        if self._draining and not self._streams and self.transport is not None:
            self.transport.close()

    # receiving

    def data_received(self, data: bytes) -> None:
        self._received_at = asyncio.get_running_loop().time()
        buffer = self._buffer
        buffer += data
        try:
            frames, at = w.frames(buffer, _MAX_FRAME)
            for kind, flags, stream_id, payload in frames:
                self._frame(kind, flags, stream_id, payload)
        except (ConnectionError, hpack.HPACKError, ValueError, IndexError, struct.error):
            self._buffer = bytearray()
            self._lost = True
            self._fail_all(_INTERNAL)  # the server broke HTTP/2: nothing more on this connection can be trusted
            if self.transport is not None:
                self.transport.close()
            return
        del buffer[:at]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is not None and kind != w.CONTINUATION:
            raise ConnectionError("a header block was not continued")
        if kind == w.DATA:
            self._data(flags, stream_id, payload)
        elif kind == w.HEADERS:
            payload = w.unpadded(flags, payload)
            if flags & w.PRIORITY_FLAG:
                payload = payload[5:]
            if flags & w.END_HEADERS:
                self._headers(stream_id, payload, bool(flags & w.END_STREAM))
            else:
                self._continuing = (stream_id, bytearray(payload), bool(flags & w.END_STREAM))
        elif kind == w.CONTINUATION:
            if self._continuing is None or self._continuing[0] != stream_id:
                raise ConnectionError("CONTINUATION without its header block")
            self._continuing[1].extend(payload)
            if len(self._continuing[1]) > _MAX_HEADER_BLOCK:
                raise ConnectionError(f"a header block over {_MAX_HEADER_BLOCK} bytes")
            if flags & w.END_HEADERS:
                continued, self._continuing = self._continuing, None
                self._headers(stream_id, bytes(continued[1]), continued[2])
        elif kind == w.RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is not None:
                error = int.from_bytes(payload[:4], "big")
                stream.refused = error == w.REFUSED_STREAM
                self._end(stream, None, w.reset_code(error))
        elif kind == w.SETTINGS:
            if not flags & w.ACK:
                self._settings(payload)
        elif kind == w.PING:
            if not flags & w.ACK:
                self._write(w.frame(w.PING, w.ACK, 0, payload))
        elif kind == w.GOAWAY:
            self._goaway(int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID)
        elif kind == w.WINDOW_UPDATE:
            self._window_update(stream_id, int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID)
        elif kind == w.PUSH_PROMISE:
            raise ConnectionError("PUSH_PROMISE, though this client disabled push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._unacked += len(payload)
        if self._unacked >= _CONNECTION_WINDOW // 2:
            self._write(w.frame(w.WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))
            self._unacked = 0
        payload = w.unpadded(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.body += payload
        if len(stream.body) > self._max_body:
            self._write(w.frame(w.RST_STREAM, 0, stream_id, struct.pack(">I", w.CANCEL)))
            self._end(stream, None, grpc.StatusCode.RESOURCE_EXHAUSTED)
        elif flags & w.END_STREAM:
            self._finish(stream, None)

    def _headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """Decode a header block (always: the decoder's table must follow every block) and apply it."""
        headers = self._decoded.get(block)
        if headers is None:
            headers = list(self._decoder.decode(block, raw=True))
            if w.changes_table(block):
                self._decoded.clear()
            else:  # its meaning holds until the tables change
                if len(self._decoded) >= _DECODED_CACHE:
                    self._decoded.clear()
                self._decoded[block] = headers
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.headers is None:
            stream.headers = headers
            if end_stream:  # trailers only: an error, or an answer without a message
                self._finish(stream, headers)
        else:
            self._finish(stream, headers)

    def _finish(self, stream: Stream, trailers: Headers | None) -> None:
        self._end(stream, *w.answer(stream.headers or (), trailers or (), stream.body))

    def _settings(self, payload: bytes) -> None:
        for at in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, at)
            if key == 0x3:  # MAX_CONCURRENT_STREAMS
                self._server_streams = self._peer_streams = value
            elif key == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                for stream in self._streams.values():
                    stream.window += value - self._peer_window
                self._peer_window = value
            elif key == 0x5:  # MAX_FRAME_SIZE
                self._peer_frame = value
        self._write(w.frame(w.SETTINGS, w.ACK, 0))
        self.heard = True
        self._resume()
        self._slots.wake_all()  # each checks the limit again

    def _goaway(self, last_stream_id: int) -> None:
        """The server takes no stream after ``last_stream_id``: those end ``UNAVAILABLE`` (it did not process
        them); earlier ones finish, then the connection closes."""
        for stream in [s for s in self._streams.values() if s.id > last_stream_id]:
            self._end(stream, None, _UNAVAILABLE)
        self.drain()

    def _window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self._send_window += increment
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            stream.window += increment
        self._resume()

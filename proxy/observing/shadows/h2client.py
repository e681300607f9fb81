"""Unary gRPC calls to a shadow over an HTTP/2 connection of mlmirror's own (a shadow's ``transport: h2``).

A shadow copy is one unary call whose answer is only compared, so everything grpc.aio does per call beyond writing
frames (a call object, its coroutines, the polling between its core and asyncio) is overhead: about 125 µs of CPU
per copy on uvloop, against about 65 µs here (docs/BENCHMARKS.md). ``H2Channel.unary`` writes a cached header
block, the client's metadata and one DATA frame; the frames of one event-loop pass go out in one write; an answer's
header blocks that leave the HPACK tables unchanged are decoded once and remembered.

What it keeps of HTTP/2 (RFC 9113): flow control both ways, the peer's frame size and stream limits, CONTINUATION,
PING and SETTINGS acknowledgements, GOAWAY (calls the server did not take end ``UNAVAILABLE``), a deadline per call
(``grpc-timeout`` sent, ``RST_STREAM`` on expiry), TLS with ALPN ``h2``, and reconnection with a backoff of 0.2 s
doubling to 2 s after a failed connect or a connection that closed before the server sent anything (calls in it
end ``UNAVAILABLE`` at once, as grpc's do); the backoff starts again at 0.2 s once a server has answered.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import grpc
from mlmirror import __version__
from mlmirror.config import Keepalive, TlsClient, Upstream
from mlmirror.config.addresses import split_address
from mlmirror.observing.shadows.h2conn import H2Connection

__all__ = ["H2Channel", "copy_channel"]

_BACKOFF = (0.2, 2.0)  # seconds: first reconnect backoff, its cap
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def copy_channel(transport: str, upstream: Upstream, max_message_size: int) -> H2Channel | None:
    """The channel a shadow's copies take for its ``transport`` (``auto``: ``h2`` when this client can reach the
    upstream's address); None for the upstream's grpc.aio channel."""
    if transport == "grpc" or (transport == "auto" and split_address(upstream.address) is None):
        return None
    return H2Channel(upstream.address, tls=upstream.tls, max_message_size=max_message_size,
                     keepalive=upstream.keepalive, user_agent=f"mlmirror/{__version__}")  # fmt: skip


def _ssl_context(tls: TlsClient) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca)
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    return context


class H2Channel:
    """One shadow upstream's connection for copies: opened on first use, again after it is lost or drained."""

    def __init__(
        self, address: str, *, tls: TlsClient | None, max_message_size: int, keepalive: Keepalive, user_agent: str
    ) -> None:
        split = split_address(address)
        if split is None:
            raise ValueError(f"transport h2 cannot reach {address!r}: one host:port, dns:///, ipv4:, ipv6: or unix:")
        self._family, self._host, self._port = split
        self._ssl = _ssl_context(tls) if tls is not None else None
        name = tls.server_name if tls is not None and tls.server_name else None
        self._server_name = name or (self._host if self._family == "inet" else "localhost")
        authority = name or (f"{self._host}:{self._port}" if self._family == "inet" else "localhost")
        if ":" in self._host and self._family == "inet" and not name:
            authority = f"[{self._host}]:{self._port}"
        self._settings = (authority, "https" if tls is not None else "http", max_message_size, user_agent,
                          (keepalive.time, keepalive.timeout))  # fmt: skip
        self._connection: H2Connection | None = None
        self._connecting: asyncio.Future[H2Connection | None] | None = None
        self._opener: asyncio.Task[None] | None = None
        self._retry_at = 0.0  # monotonic seconds: no connect before then (after a failed one)
        self._backoff = _BACKOFF[0]
        self._closed = False
        #: connections opened (for tests)
        self.connects = 0

    async def unary(
        self, method: str, request: bytes, metadata: tuple[tuple[str, str | bytes], ...], seconds: float
    ) -> tuple[bytes | None, grpc.StatusCode]:
        """Send ``request`` to ``method``: (the answer or None, its code); never raises but when cancelled."""
        deadline = time.monotonic() + seconds
        connection = self._connection
        if connection is None or not connection.usable:
            opened = await self._connect(seconds)
            if not isinstance(opened, H2Connection):
                return None, opened
            connection = opened
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, grpc.StatusCode.DEADLINE_EXCEEDED
        return await connection.unary(method, request, metadata, remaining)

    async def _connect(self, seconds: float) -> H2Connection | grpc.StatusCode:
        """The live connection, opening one when none is (one attempt shared by every caller, each waiting for it
        at most its own ``seconds``); else why not: ``UNAVAILABLE`` (no connection), ``DEADLINE_EXCEEDED``."""
        if self._closed or time.monotonic() < self._retry_at:
            return _UNAVAILABLE
        old = self._connection
        if old is not None and self._connecting is None:
            self._connection = None
            old.drain()  # out of stream ids, it still has calls to finish; lost or drained, this does nothing
            if not old.heard:  # it went before the server said anything: as good as a failed connect
                self._failed()
                return _UNAVAILABLE
            self._backoff = _BACKOFF[0]
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            self._opener = asyncio.get_running_loop().create_task(self._open(self._connecting, seconds))
        try:
            async with asyncio.timeout(seconds):
                opened = await asyncio.shield(self._connecting)
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return opened if opened is not None else _UNAVAILABLE

    async def _open(self, done: asyncio.Future[H2Connection | None], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        connection: H2Connection | None = None
        try:
            async with asyncio.timeout(max(seconds, 0.05)):
                factory = lambda: H2Connection(*self._settings)  # noqa: E731
                if self._family == "unix":
                    _, connection = await loop.create_unix_connection(
                        factory, self._host, ssl=self._ssl, server_hostname=self._server_name if self._ssl else None
                    )
                else:
                    _, connection = await loop.create_connection(
                        factory, self._host, self._port, ssl=self._ssl,
                        server_hostname=self._server_name if self._ssl else None,
                    )  # fmt: skip
                if self._ssl is not None:
                    transport = connection.transport
                    tls = transport.get_extra_info("ssl_object") if transport is not None else None
                    if tls is None or tls.selected_alpn_protocol() != "h2":
                        connection.close()
                        raise ConnectionError("the upstream did not agree to HTTP/2 (ALPN h2)")
        except Exception:  # refused, unreachable, TLS, an unresolvable or malformed host: all a failed connect
            connection = None
            self._failed()
        else:
            self.connects += 1
            if self._closed:
                connection.close()
                connection = None
            else:
                self._connection = connection
        finally:
            self._connecting = None
            if not done.done():
                done.set_result(connection)

    def _failed(self) -> None:
        """No connect before the backoff has passed; the next backoff is twice as long, up to its cap."""
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF[1])

    def close(self) -> None:
        """Close the connection, and stop a connect under way; calls in flight end ``UNAVAILABLE``."""
        self._closed = True
        if self._opener is not None:
            self._opener.cancel()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

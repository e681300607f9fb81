"""The admin endpoint's HTTP server (aiohttp): keep-alive, and the limits on head, body, time and connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from mlmirror.admin import http
from mlmirror.admin.http import AdminServer, Request, Response


class Route:
    def __init__(self, method: str, path: str, auth: str = "admin") -> None:
        self.method, self.path, self.auth = method, path, auth

    async def handler(self, request: Request) -> Response:
        return Response.text(f"{request.method} {request.path} {len(request.body)} {dict(request.query)}")


@contextlib.asynccontextmanager
async def serving(**kwargs) -> AsyncIterator[AdminServer]:
    """An admin server on a free loopback port with GET and POST /a (which echo what they got), until the block
    ends."""
    server = AdminServer("127.0.0.1:0", [Route("GET", "/a"), Route("POST", "/a")], **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return reply


async def request(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    """The whole reply to one request on a connection of its own (``Connection: close``)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    return await exchange(port, head.encode() + body)


async def test_a_kept_alive_connection_answers_one_request_after_another():
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for n in range(3):
            writer.write(f"GET /a?n={n}&n=last HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200 OK")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                         .split(b":")[1])  # fmt: skip
            assert await reader.readexactly(length) == b"GET /a 0 {'n': 'last'}\n"
        writer.close()


async def test_the_limits_on_head_and_body_answer_431_and_413():
    async with serving() as server:
        big_header = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await exchange(server.port, big_header)).startswith(b"HTTP/1.1 431")
        many = b"GET /a HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n"
        assert (await exchange(server.port, many)).startswith(b"HTTP/1.1 431")
        body = b"x" * (2**20 + 1)
        assert (await request(server.port, "POST", "/a", body)).startswith(b"HTTP/1.1 413")
        reply = await request(server.port, "POST", "/a", b"x" * 2**20)
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(b"POST /a 1048576 {}\n")


async def test_a_head_or_body_that_never_comes_is_cut_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(http, "_READ_TIMEOUT", 0.5)
    async with serving() as server:
        assert await exchange(server.port, b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: ") == b""  # closed, nothing answered
        reply = await exchange(server.port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        assert reply.startswith(b"HTTP/1.1 408")


async def test_connections_over_the_limit_get_503(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(http, "_MAX_CONNECTIONS", 2)
    async with serving() as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for _, writer in held:  # each is known to the server once it has served a request
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in held:
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200")
        assert (await exchange(server.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 503")
        for _, writer in held:
            writer.close()

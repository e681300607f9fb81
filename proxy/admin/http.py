"""The admin endpoints' HTTP server (declared in proxy/admin/endpoints.py), on aiohttp.

It runs on the proxy's event loop with HTTP/1.1 keep-alive (a browser loads the dashboard's page and assets over
one connection), and bounds what clients can make it hold: 16 KiB per request line or header and 64 header lines,
1 MiB of body, 10 s to send a request's head and body, 10 s idle between requests on a kept-alive connection, and
128 connections at once (the next ones get a 503 and are closed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

__all__ = ["AdminRoute", "AdminServer", "Request", "Response"]

log = logging.getLogger(__name__)

_MAX_LINE = 16 * 1024  # bytes per request line or header line
_MAX_HEADERS = 64
_MAX_BODY = 2**20
_READ_TIMEOUT = 10.0  # seconds for a request's head and body
_KEEPALIVE = 10.0  # seconds a kept-alive connection may stay idle
_LINGER = 2.0  # seconds the rest of a body not taken (408, 413) is read and dropped, so the client reads the answer
_MAX_CONNECTIONS = 128


@dataclass(frozen=True, slots=True)
class Request:
    """One admin request. Header names are lower-case; ``query`` maps each name to its last value."""

    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode() if text.endswith("\n") else (text + "\n").encode())

    @classmethod
    def json(cls, value: object, status: int = 200) -> Response:
        return cls(status, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode(), "application/json")


Handler = Callable[[Request], Awaitable[Response]]


class AdminRoute(Protocol):
    """One endpoint as the server needs it (proxy/admin/endpoints.py declares them)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def handler(self) -> Handler: ...
    @property
    def auth(self) -> str:
        """``admin``: needs the admin bearer token (when one is set); ``open``: needs nothing; ``own``: the handler
        checks the credentials itself."""
        ...


class AdminServer:
    """Serves ``routes`` (method, path, handler, auth): a path whose routes are all ``auth="admin"`` needs the
    bearer ``token`` when one is set; ``open`` paths need nothing, and ``own`` paths check credentials in their
    handler. ``services``: started with the server and closed with it (the dashboard's history sampler)."""

    def __init__(
        self,
        address: str,
        routes: Sequence[AdminRoute],
        *,
        token: str | None = None,
        services: Sequence[Service] = (),
    ) -> None:
        self.address = address
        self._routes: dict[tuple[str, str], AdminRoute] = {}
        self._unchecked: frozenset[str] = frozenset()
        self.add_routes(routes)
        self._token = token
        self._services = tuple(services)
        self._server: web.Server | None = None
        self._listening: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()  # the open connections

    def add_routes(self, routes: Sequence[AdminRoute]) -> None:
        self._routes.update({(route.method, route.path): route for route in routes})
        self._unchecked = frozenset(route.path for route in self._routes.values() if route.auth != "admin")

    @property
    def token(self) -> str | None:
        return self._token

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()

        def make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY)

        self._server = server = web.Server(self._handle, request_factory=make_request, handler_cancellation=True)

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= _MAX_CONNECTIONS:
                return _Refuse()
            quiet: Any = None  # no access log (aiohttp's own way to say so, though its annotation wants a Logger)
            handler = _Connection(server, loop=loop, max_line_size=_MAX_LINE, max_field_size=_MAX_LINE,
                                  max_headers=_MAX_HEADERS, keepalive_timeout=_KEEPALIVE, lingering_time=_LINGER,
                                  access_log=quiet)  # fmt: skip
            return _Timed(handler, self._transports)

        self._listening = await loop.create_server(protocol, host.strip("[]") or None, int(port))
        for service in self._services:
            await service.start()

    @property
    def port(self) -> int:
        assert self._listening is not None
        assert self._listening.sockets
        return self._listening.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for service in self._services:
            await service.close()
        if self._listening is not None:
            self._listening.close()
            if self._server is not None:
                await self._server.shutdown(1.0)  # lets the requests being answered finish, for up to 1 s
            for transport in list(self._transports):  # aiohttp leaves idle kept-alive connections open
                transport.close()
            await self._listening.wait_closed()
            self._listening = None

    async def _handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                body = await raw.read()
        except TimeoutError:
            return _closing(Response.text("request not received in time", HTTPStatus.REQUEST_TIMEOUT))
        except web.HTTPRequestEntityTooLarge:
            return _closing(Response.text(f"body larger than {_MAX_BODY} bytes", 413))
        request = Request(
            method=raw.method, path=raw.path, query={name: raw.query.getall(name)[-1] for name in raw.query},
            headers={name.lower(): value for name, value in raw.headers.items()}, body=body,
        )  # fmt: skip
        return _answer(await self._dispatch(request))

    async def _dispatch(self, request: Request) -> Response:
        if self._token is not None and request.path not in self._unchecked and not self._authorized(request):
            return Response(
                401, b"unauthorized: send Authorization: Bearer <admin token>\n", "text/plain; charset=utf-8",
                (("WWW-Authenticate", 'Bearer realm="mlmirror"'),),
            )  # fmt: skip
        route = self._routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self._routes):
                allowed = sorted(m for m, path in self._routes if path == request.path)
                return Response.text(f"method {request.method} not allowed here (use {', '.join(allowed)})", 405)
            groups: dict[str, set[str]] = {}
            for known_route in self._routes.values():
                groups.setdefault(getattr(known_route, "group", "api"), set()).add(known_route.path)
            known = ", ".join(sorted(groups.pop("api", set())))
            more = "".join(f"; {group}: {', '.join(sorted(paths))}" for group, paths in sorted(groups.items()))
            return Response.text(f"no such endpoint: {request.path} (known: {known}{more})", 404)
        try:
            return await route.handler(request)
        except Exception:
            log.exception("admin endpoint %s %s failed", request.method, request.path)
            return Response.text("internal error; see the proxy's log", 500)

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        assert self._token is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token.encode())


class Service(Protocol):
    """Something that runs alongside the admin server (started after it binds, closed before it stops)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


def _answer(response: Response) -> web.Response:
    answer = web.Response(status=response.status, body=response.body, headers=dict(response.headers))
    answer.headers["Content-Type"] = response.content_type
    return answer


def _closing(response: Response) -> web.Response:
    """``response``, then the connection closes: the rest of a body not taken may still come, and nothing after it
    on this connection can be read as a request."""
    answer = _answer(response)
    answer.force_close()
    return answer


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, answering requests it cannot parse as the admin always has: HTTP/1.1,
    400 for a malformed request and 431 for a head over the limits, in plain words, without logging a traceback."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower():
            status, text = 431, "request head too large"
        else:
            text = f"malformed request: {getattr(exc, 'message', None) or exc or message}"
        log.debug("admin: bad request (%s): %s", status, exc)
        answer = _Http11(status=status, text=text + "\n")
        answer.force_close()
        return answer


class _Http11(web.Response):
    """A response that says HTTP/1.1 even to a request whose version could not be read (aiohttp says 1.0 then)."""

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        assert writer is not None
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)
        writer.send_headers()


class _Timed(asyncio.Protocol):
    """aiohttp's protocol for one connection, closed when the first request's head has not arrived within
    ``_READ_TIMEOUT`` of the connection opening (aiohttp bounds the idle time between requests, ``_KEEPALIVE``, and
    the handler bounds reading the body, but nothing bounds a slow first head)."""

    def __init__(self, inner: RequestHandler, open_transports: set[asyncio.BaseTransport]) -> None:
        self._inner = inner
        self._open = open_transports
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._open.add(transport)
        self._inner.connection_made(transport)
        self._timer = asyncio.get_running_loop().call_later(_READ_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._open.discard(self._transport)
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refuse(asyncio.Protocol):
    """Over ``_MAX_CONNECTIONS``: a 503 and the connection closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = b"too many admin connections; try again\n"
        transport.write(  # type: ignore[attr-defined]  # a stream transport (uvloop's are not asyncio.Transport)
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.close()

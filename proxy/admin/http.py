"""A small HTTP/1.1 server for the admin endpoints (``/metrics``, ``/healthz``, ``/readyz``, ``/status`` ...).

It runs on the proxy's event loop, answers one request per connection (``Connection: close``), and bounds what a
client can make it hold: 16 KiB of request head, 1 MiB of body, 10 s to send them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

__all__ = ["AdminServer", "Request", "Response", "answer_promotion", "endpoints", "json_number"]

log = logging.getLogger(__name__)

#: Endpoints answered without the admin token: liveness and readiness probes (they reveal no more than up or down).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_MAX_HEAD = 16 * 1024
_MAX_BODY = 2**20
_READ_TIMEOUT = 10.0


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

#: Every admin endpoint: (method, path) -> the name of the method that answers it on the serving object.
ENDPOINTS = {
    ("GET", "/metrics"): "_get_metrics",
    ("GET", "/healthz"): "_get_healthz",
    ("GET", "/readyz"): "_get_readyz",
    ("GET", "/status"): "_get_status",
    ("POST", "/reload"): "_post_reload",
    ("POST", "/promote"): "_post_promote",
    ("POST", "/outcomes"): "handle_outcomes",
}
PROMOTE_USAGE = "give route and shadow: POST /promote?route=ROUTE&shadow=SHADOW[&force=1]"


def endpoints(server: object) -> dict[tuple[str, str], Handler]:
    """The admin routes of ``server`` (a proxy, or the supervisor of a group): its methods named in ENDPOINTS."""
    return {key: getattr(server, name) for key, name in ENDPOINTS.items()}


async def answer_promotion(
    request: Request, promote: Callable[[str, str, bool], Awaitable[str]], refused: type[Exception]
) -> Response:
    """``POST /promote?route=R&shadow=S[&force=1]``: ``promote(route, shadow, force)`` says what it did, or raises
    ``refused`` (404 when the exception says ``unknown_name``, else 409)."""
    route, shadow = request.query.get("route", ""), request.query.get("shadow", "")
    if not route or not shadow:
        return Response.text(PROMOTE_USAGE, 400)
    force = request.query.get("force", "") in ("1", "true", "yes")
    try:
        return Response.text(await promote(route, shadow, force))
    except refused as exc:
        return Response.text(f"not promoted: {exc}", 404 if getattr(exc, "unknown_name", False) else 409)


def json_number(value: float) -> float | None:
    """A figure for a JSON answer: rounded to 6 decimals; NaN (unknown) as null, since JSON has no NaN."""
    return None if math.isnan(value) else round(float(value), 6)


class AdminServer:
    """Serves ``routes``: (HTTP method, path) → async handler."""

    def __init__(
        self, address: str, routes: Mapping[tuple[str, str], Handler], *, token: str | None = None,
        self_checked: frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        """``token``: the admin bearer token every path but ``OPEN_PATHS`` and ``self_checked`` needs; the handlers
        of ``self_checked`` paths check credentials themselves (``/outcomes`` also takes the feedback token)."""
        self.address = address
        self._routes = dict(routes)
        self._token = token
        self._unchecked = OPEN_PATHS | self_checked
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        self._server = await asyncio.start_server(
            self._connection, host.strip("[]") or None, int(port), limit=_MAX_HEAD
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        assert self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), _READ_TIMEOUT)
                response = await self._dispatch(request) if isinstance(request, Request) else request
            except TimeoutError:
                response = Response.text("request not received in time", HTTPStatus.REQUEST_TIMEOUT)
            writer.write(_encode(response))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: Request) -> Response:
        if self._token is not None and request.path not in self._unchecked and not self._authorized(request):
            return Response(
                401, b"unauthorized: send Authorization: Bearer <admin token>\n", "text/plain; charset=utf-8",
                (("WWW-Authenticate", 'Bearer realm="mlmirror"'),),
            )  # fmt: skip
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self._routes):
                allowed = sorted(m for m, path in self._routes if path == request.path)
                return Response.text(f"method {request.method} not allowed here (use {', '.join(allowed)})", 405)
            known = ", ".join(sorted({path for _, path in self._routes}))
            return Response.text(f"no such endpoint: {request.path} (known: {known})", 404)
        try:
            return await handler(request)
        except Exception:
            log.exception("admin endpoint %s %s failed", request.method, request.path)
            return Response.text("internal error; see the proxy's log", 500)

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        assert self._token is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token.encode())


async def _read_request(reader: asyncio.StreamReader) -> Request | Response:
    """Parse one request, or return the error response it deserves."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return Response.text("request head too large", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return Response.text("malformed request line", 400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                return Response.text("malformed header line", 400)
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        return Response.text("chunked bodies are not accepted; send Content-Length", 411)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return Response.text("bad Content-Length", 400)
    if length < 0 or length > _MAX_BODY:
        return Response.text(f"body larger than {_MAX_BODY} bytes", 413)
    body = await reader.readexactly(length) if length else b""
    target = urlsplit(parts[1])
    query = {name: values[-1] for name, values in parse_qs(target.query).items()}
    return Request(method=parts[0], path=target.path, query=query, headers=headers, body=body)


def _encode(response: Response) -> bytes:
    reason = HTTPStatus(response.status).phrase
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        + "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + response.body

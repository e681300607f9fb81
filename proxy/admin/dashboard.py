"""The dashboard on the admin port: ``GET /`` (the page), ``GET /ui?file=NAME`` (its assets, served from the
package: no CDN, no build step) and ``GET /history`` (the JSON the page polls every 2 s: proxy/admin/history.py).

The page needs the admin token when one is set: ``/`` takes it as ``Authorization: Bearer`` or as ``?token=``
(without it: 401 and a small form asking for it); the page then sends it as a bearer token on every ``/history``
call. The assets are open: they are the page's code and a vendored chart library (uPlot 1.6.32, MIT, its license
in ui/vendor/uPlot.LICENSE), and hold no data.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources

from mlmirror.admin.endpoints import AdminTarget, Endpoint, admin_endpoints
from mlmirror.admin.history import History
from mlmirror.admin.http import AdminServer, Request, Response

__all__ = ["ASSETS", "admin_server", "dashboard_endpoints"]

#: The page's assets (``GET /ui?file=NAME``) and their content types.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
_FOLDERS = {"uPlot.iife.min.js": "vendor", "uPlot.min.css": "vendor", "uPlot.LICENSE": "vendor"}
_ASK = """<!doctype html><meta charset="utf-8"><title>mlmirror: token needed</title>
<form method="get" action="/" style="font:16px sans-serif;margin:3em">
<p>This mlmirror admin endpoint needs its admin token (<code>admin_token_file</code>).</p>
<input id="token" name="token" type="password" size="40" autofocus> <button>Open the dashboard</button></form>
"""


def _asset(name: str) -> bytes:
    folder = resources.files("mlmirror.admin").joinpath("ui")
    if name in _FOLDERS:
        folder = folder.joinpath(_FOLDERS[name])
    return folder.joinpath(name).read_bytes()


def dashboard_endpoints(history: History, token: Callable[[], str | None]) -> tuple[Endpoint, ...]:
    """``/``, ``/ui`` and ``/history`` over ``history``; ``token``: the admin token now (None: open)."""

    async def page(request: Request) -> Response:
        expected = token()
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return Response(401, _ASK.encode(), "text/html; charset=utf-8",
                                (("WWW-Authenticate", 'Bearer realm="mlmirror"'),))  # fmt: skip
        return Response(200, _asset("index.html"), "text/html; charset=utf-8", (("Cache-Control", "no-store"),))

    async def asset(request: Request) -> Response:
        name = request.query.get("file", "")
        if name not in ASSETS:
            return Response.text(f"no such asset: {name!r} (known: {', '.join(sorted(ASSETS))})", 404)
        return Response(200, _asset(name), ASSETS[name], (("Cache-Control", "max-age=300"),))

    async def history_json(request: Request) -> Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return Response.text("since: Unix seconds, e.g. /history?since=1700000000", 400)
        body = json.dumps(history.snapshot(since), separators=(",", ":")).encode()  # compact: polled every 2 s
        return Response(200, body, "application/json", (("Cache-Control", "no-store"),))

    return (
        Endpoint("GET", "/", page, "own", "dashboard"),
        Endpoint("GET", "/ui", asset, "open", "dashboard"),
        Endpoint("GET", "/history", history_json, "admin", "dashboard"),
    )


def admin_server(
    address: str,
    target: AdminTarget,
    refused: type[Exception],
    *,
    token: str | None,
    thresholds: Callable[[], Mapping[str, float]] | None = None,
) -> AdminServer:
    """The admin server of ``target``: its endpoints, and the dashboard with a history (proxy/admin/history.py) when
    ``thresholds`` (route -> required shadow agreement, from the config in force) is given; the internal endpoint
    of a serving worker has no dashboard."""
    routes: Sequence[Endpoint] = admin_endpoints(target, refused)
    if thresholds is None:
        return AdminServer(address, routes, token=token)
    history = History(target.status_report, target.exposition, thresholds)
    server = AdminServer(address, routes, token=token, services=(history,))
    server.add_routes(dashboard_endpoints(history, lambda: server.token))
    return server


def agreement_thresholds(config: object) -> dict[str, float]:
    """route -> the shadow agreement its promotion needs, from a ``Config``."""
    return {route.name: route.promotion.agreement for route in getattr(config, "routes", ())}

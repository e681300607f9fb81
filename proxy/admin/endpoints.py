"""The admin endpoints, declared once: what each path answers, in terms of an ``AdminTarget`` — a lone proxy, or
the supervisor of a worker group, which each say what they know and leave the HTTP to this module.

=======================  =====  ==========================================================================
endpoint                 token  answer
=======================  =====  ==========================================================================
``GET /metrics``         yes    the Prometheus exposition
``GET /healthz``         no     ``ok`` while the process runs
``GET /readyz``          no     ``ready`` (200) or ``not ready`` (503), then one reason per line
``GET /status``          yes    JSON: routes, upstreams, shadows, drift, ...
``POST /reload``         yes    reload the config file: 200, or 400 when it was refused
``POST /promote``        yes    ``?route=R&shadow=S[&force=1]``: 200, 400 (usage), 404 (names), 409 (refused)
``POST /outcomes``       own    ground truth as JSON: the counts by result, or 400 for a bad body (the admin or
                                the feedback token, checked by the target)
``GET /``                own    the dashboard's page (the admin token as a bearer token or ``?token=``)
``GET /ui``              no     ``?file=NAME``: the page's assets (its code and the vendored chart library)
``GET /history``         yes    JSON: the dashboard's history (proxy/admin/history.py), ``?since=`` Unix s
=======================  =====  ==========================================================================

The last three are the dashboard (proxy/admin/dashboard.py), served where the data is merged: by a lone proxy and
by a supervisor, not by a serving worker's internal endpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlmirror.admin.http import Request, Response
from mlmirror.observing.groundtruth.feedback import parse_outcomes_json

__all__ = ["ENDPOINTS", "PROMOTE_USAGE", "AdminTarget", "Endpoint", "admin_endpoints", "outcomes_answer"]

#: Every admin endpoint, (method, path), and who checks its credentials (see ``Endpoint``). docs/ENDPOINTS.md lists
#: the same (tests/test_docs.py).
ENDPOINTS: dict[tuple[str, str], str] = {
    ("GET", "/metrics"): "admin",
    ("GET", "/healthz"): "open",
    ("GET", "/readyz"): "open",
    ("GET", "/status"): "admin",
    ("POST", "/reload"): "admin",
    ("POST", "/promote"): "admin",
    ("POST", "/outcomes"): "own",
    ("GET", "/"): "own",
    ("GET", "/ui"): "open",
    ("GET", "/history"): "admin",
}
PROMOTE_USAGE = "give route and shadow: POST /promote?route=ROUTE&shadow=SHADOW[&force=1]"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One admin endpoint. ``auth``: ``admin`` (the admin bearer token, when one is set), ``open`` (none: the
    liveness and readiness probes, which reveal no more than up or down) or ``own`` (the handler checks the
    credentials itself: ``/outcomes`` also takes the feedback token)."""

    method: str
    path: str
    handler: Handler
    auth: str = "admin"
    group: str = "api"  # or "dashboard": the 404 lists the groups apart


class AdminTarget(Protocol):
    """What the admin endpoints ask of the process they serve."""

    async def exposition(self) -> tuple[bytes, str]:
        """(Prometheus text, its content type)."""
        ...

    async def ready_report(self) -> tuple[bool, list[str]]:
        """(ready, one reason per line)."""
        ...

    async def status_report(self) -> dict[str, object]: ...

    async def reload_report(self) -> tuple[bool, str]:
        """Reload the config file: (taken, what happened in words)."""
        ...

    async def promote(self, route: str, shadow: str, *, force: bool = False) -> str:
        """What was done, in words; raises the ``refused`` exception given to ``admin_endpoints``."""
        ...

    async def outcomes(self, request: Request) -> Response:
        """The answer to ``POST /outcomes``: the target checks the credentials (the admin or the feedback token),
        then a proxy reads the body with ``outcomes_answer``; a supervisor passes it on to the process that holds
        the ground truth."""
        ...


def outcomes_answer(body: bytes, report: Callable[[list[Any]], dict[str, int]]) -> Response:
    """``POST /outcomes``: ground truth as JSON (proxy/observing/groundtruth/feedback.py) given to ``report``, which
    counts them by result; 400 for a body that cannot be read."""
    try:
        parsed = parse_outcomes_json(body)
    except ValueError as exc:
        return Response.text(f"bad outcomes: {exc}", 400)
    return Response.json(report(parsed))


def admin_endpoints(target: AdminTarget, refused: type[Exception]) -> tuple[Endpoint, ...]:
    """Every admin endpoint of ``target``. ``refused``: the exception ``target.promote`` raises for a promotion it
    will not make (answered 404 when the exception says ``unknown_name``, else 409)."""

    async def metrics(request: Request) -> Response:
        body, content_type = await target.exposition()
        return Response(200, body, content_type)

    async def healthz(request: Request) -> Response:
        return Response.text("ok")

    async def readyz(request: Request) -> Response:
        ready, lines = await target.ready_report()
        return Response.text("\n".join(["ready" if ready else "not ready", *lines]), 200 if ready else 503)

    async def status(request: Request) -> Response:
        return Response.json(await target.status_report())

    async def reload(request: Request) -> Response:
        ok, text = await target.reload_report()
        return Response.text(text, 200 if ok else 400)

    async def promote(request: Request) -> Response:
        route, shadow = request.query.get("route", ""), request.query.get("shadow", "")
        if not route or not shadow:
            return Response.text(PROMOTE_USAGE, 400)
        force = request.query.get("force", "") in ("1", "true", "yes")
        try:
            return Response.text(await target.promote(route, shadow, force=force))
        except refused as exc:
            return Response.text(f"not promoted: {exc}", 404 if getattr(exc, "unknown_name", False) else 409)

    async def outcomes(request: Request) -> Response:
        return await target.outcomes(request)

    handlers = {
        ("GET", "/metrics"): metrics,
        ("GET", "/healthz"): healthz,
        ("GET", "/readyz"): readyz,
        ("GET", "/status"): status,
        ("POST", "/reload"): reload,
        ("POST", "/promote"): promote,
        ("POST", "/outcomes"): outcomes,
    }
    assert handlers.keys() <= ENDPOINTS.keys()  # the dashboard's are proxy/admin/dashboard.py's
    return tuple(Endpoint(method, path, handlers[method, path], ENDPOINTS[method, path]) for method, path in handlers)

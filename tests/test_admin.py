"""The admin endpoint: /metrics (checked by the real promtool), /healthz, /readyz, /status, and bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import grpc
import pytest
from mlmirror.admin.endpoints import admin_endpoints, outcomes_answer
from mlmirror.admin.http import AdminServer, Request, Response
from mlmirror.config import parse_config
from mlmirror.errors import ConfigError
from mlmirror.observing.shadows.promotion import PromotionError, UnknownNameError
from prometheus_client.parser import text_string_to_metric_families

from loadtest.ports import free_port
from tests.support import ECHO, REPO, EchoServer, guarded_proxy, http_get, promtool_accepts, through_proxy, wait_until

REQUIRED_METRICS = {
    "mlmirror_requests": ("route", "upstream", "role", "grpc_code"),
    "mlmirror_request_duration_seconds": ("route", "upstream", "role"),
    "mlmirror_fallbacks": ("route", "from_upstream", "to", "reason"),
    "mlmirror_circuit_state": ("upstream",),
    "mlmirror_config_reloads": ("result",),
}


def config(primary: str, fallback: str) -> str:
    return textwrap.dedent(f"""
    method_types: {{{ECHO}Unary: unary_unary}}
    upstreams:
      primary: {{address: {primary}, health_check: {{interval: 100ms, timeout: 100ms}}}}
      fallback: {{address: {fallback}, health_check: {{interval: 100ms, timeout: 100ms}}}}
    routes:
      - {{name: main, match: {{}}, primary: primary, fallback: [fallback]}}
    """)


async def get(proxy, path: str, method: str = "GET") -> tuple[int, str]:
    return await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}{path}", method)


@pytest.mark.process
async def test_metrics_expose_the_documented_families_and_pass_promtool():
    async with (
        EchoServer("p") as primary,
        EchoServer("f") as fallback,
        through_proxy(config(primary.address, fallback.address)) as (proxy, channel),
    ):
        await channel.unary_unary(ECHO + "Unary")(b"x")
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        await channel.unary_unary(ECHO + "Unary")(b"y")
        status, body = await get(proxy, "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(body)}
    for name, labels in REQUIRED_METRICS.items():
        assert name in families, name
        sample = families[name].samples[0]
        assert set(labels) <= set(sample.labels), (name, sample.labels)
    assert families["mlmirror_request_duration_seconds"].type == "histogram"
    # the process itself: live asyncio tasks (at least the admin handler and the loop-lag probe), fds, memory
    assert families["mlmirror_process_tasks"].samples[0].value >= 2
    assert families["process_open_fds"].samples[0].value >= 3
    assert families["process_resident_memory_bytes"].samples[0].value > 10e6
    fallbacks = [s for s in families["mlmirror_fallbacks"].samples if s.name == "mlmirror_fallbacks_total"]
    assert [(s.labels["from_upstream"], s.labels["to"], s.labels["reason"], s.value) for s in fallbacks] == [
        ("primary", "fallback", "unavailable", 1.0)
    ]
    await asyncio.to_thread(promtool_accepts, body)


async def test_readyz_says_why_not_and_turns_ready_when_an_upstream_is_reachable():
    primary_port = free_port()
    async with EchoServer("f") as fallback:
        fallback_address = fallback.address
    # Neither upstream is listening yet.
    async with through_proxy(config(f"127.0.0.1:{primary_port}", fallback_address)) as (proxy, channel):
        await wait_until(lambda: all(t.reachable is False for t in proxy.table.targets.values()), 5, "health checks")
        status, body = await get(proxy, "/readyz")
        assert status == 503
        assert body.startswith("not ready")
        assert "main: no reachable upstream (primary: no answer within 0.1s" in body
        assert "fallback: no answer within 0.1s" in body

        async with EchoServer("f2") as revived:
            await revived.stop()
            revived_fallback = await EchoServer("f").start(int(fallback_address.rsplit(":", 1)[1]))
            try:
                await wait_until(lambda: proxy.readiness()[0], 10, "the fallback to be reachable")
                status, body = await get(proxy, "/readyz")
                assert status == 200
                assert body.splitlines() == ["ready", "main: served by fallback"]
                assert proxy.metrics.registry.get_sample_value("mlmirror_ready") == 1
            finally:
                await revived_fallback.stop()


async def test_status_reports_routes_upstreams_circuits_and_counters():
    async with (
        EchoServer("p") as primary,
        EchoServer("f") as fallback,
        through_proxy(config(primary.address, fallback.address)) as (proxy, channel),
    ):
        await wait_until(lambda: proxy.readiness()[0], 5, "ready")
        for _ in range(3):
            await channel.unary_unary(ECHO + "Unary")(b"x")
        primary.fail_with = grpc.StatusCode.UNAVAILABLE
        await channel.unary_unary(ECHO + "Unary")(b"x")
        status, body = await get(proxy, "/status")
    assert status == 200
    import json

    report = json.loads(body)
    assert report["ready"] is True
    assert report["draining"] is False
    [route] = report["routes"]
    assert route["name"] == "main"
    assert (route["primary"], route["fallback"]) == ("primary", ["fallback"])
    assert route["calls"] == {"OK": 4}
    assert route["fallbacks"] == {"fallback": 1}
    upstreams = report["upstreams"]
    assert upstreams["primary"]["requests"] == {"OK": 3, "UNAVAILABLE": 1}
    assert upstreams["fallback"]["requests"] == {"OK": 1}
    assert upstreams["primary"]["circuit"]["state"] == "closed"
    assert upstreams["primary"]["circuit"]["consecutive_failures"] == 1
    assert upstreams["primary"]["reachable"] is True
    assert report["config_reloads"] == {"success": 0, "failure": 0}


async def test_healthz_and_bad_requests():
    async with (
        EchoServer("p") as primary,
        EchoServer("f") as fallback,
        through_proxy(config(primary.address, fallback.address)) as (proxy, _),
    ):
        assert await get(proxy, "/healthz") == (200, "ok\n")
        status, body = await get(proxy, "/nope")
        assert status == 404
        assert "known: /healthz, /metrics, /outcomes, /promote, /readyz, /reload, /status" in body
        status, body = await get(proxy, "/status", method="POST")
        assert status == 405
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
        writer.write(b"GARBAGE\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400 Bad Request")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
        writer.write(b"GET /status HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("admin", ["off", "null"])
async def test_the_admin_endpoint_can_be_turned_off(admin: str):
    async with (
        EchoServer("p") as primary,
        EchoServer("f") as fallback,
        through_proxy(f"admin: {admin}\n" + config(primary.address, fallback.address)) as (proxy, _),
    ):
        assert proxy.admin_port is None


@pytest.mark.process
async def test_an_admin_token_guards_every_endpoint_but_the_probes(tmp_path):
    async with guarded_proxy(tmp_path, "s3cret-token") as base:

        def get_with(path: str, token: str | None, method: str = "GET") -> tuple[int, str, str]:
            request = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
            if token is not None:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read().decode(), ""
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode(), exc.headers.get("WWW-Authenticate", "")

        for path in ("/metrics", "/status"):
            status, body, challenge = await asyncio.to_thread(get_with, path, None)
            assert (status, challenge) == (401, 'Bearer realm="mlmirror"')
            assert "Authorization: Bearer" in body
            assert (await asyncio.to_thread(get_with, path, "wrong"))[0] == 401
            assert (await asyncio.to_thread(get_with, path, "s3cret-token"))[0] == 200
        assert (await asyncio.to_thread(get_with, "/reload", None, "POST"))[0] == 401
        for path in ("/healthz", "/readyz"):  # probes stay open
            assert (await asyncio.to_thread(get_with, path, None))[0] in (200, 503)
        cli = [sys.executable, "-m", "mlmirror", "status", "--admin", base.removeprefix("http://")]
        denied = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, cwd=REPO, timeout=30)
        assert denied.returncode == 1
        env = {**os.environ, "MLMIRROR_ADMIN_TOKEN": "s3cret-token"}
        allowed = await asyncio.to_thread(
            subprocess.run, cli, capture_output=True, text=True, cwd=REPO, timeout=30, env=env
        )
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert json.loads(allowed.stdout)["ready"] in (True, False)


def test_an_empty_admin_token_file_is_a_config_error(tmp_path):
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(f"admin_token_file: {tmp_path / 'token'}\nupstreams: {{a: 127.0.0.1:1}}\n"
                     "routes: [{match: {}, primary: a}]\n", "conf.yaml")  # fmt: skip
    assert caught.value.key == "admin_token_file"
    assert "is empty" in caught.value.reason


class ScriptedTarget:
    """An ``AdminTarget`` that answers from fixed values and records what it was asked: the admin endpoints are
    declared once (proxy/admin/endpoints.py) for a proxy and a supervisor, so they are tested here on their own."""

    def __init__(self) -> None:
        self.asked: list[object] = []
        self.ready = False

    async def exposition(self) -> tuple[bytes, str]:
        return b"# scripted\nx_total 1.0\n", "text/plain; version=0.0.4; charset=utf-8"

    async def ready_report(self) -> tuple[bool, list[str]]:
        return self.ready, ["worker 0: fine", "worker 1: starting"]

    async def status_report(self) -> dict[str, object]:
        return {"ready": self.ready}

    async def reload_report(self) -> tuple[bool, str]:
        self.asked.append("reload")
        return False, "reload incomplete\nworker 1: 400"

    async def promote(self, route: str, shadow: str, *, force: bool = False) -> str:
        self.asked.append((route, shadow, force))
        if shadow == "nope":
            raise UnknownNameError(f"route {route!r} has no shadow 'nope'")
        if not force:
            raise PromotionError("not promotable: too few samples")
        return f"route {route}: primary is now {shadow}"

    async def outcomes(self, request: Request) -> Response:
        return outcomes_answer(request.body, self.report)

    def report(self, outcomes: list) -> dict[str, int]:
        self.asked.append(outcomes)
        return {"matched": len(outcomes)}


async def test_the_declared_endpoints_answer_for_any_target_and_guard_what_they_declare():
    target = ScriptedTarget()
    declared = admin_endpoints(target, PromotionError)
    assert {(e.method, e.path) for e in declared if e.auth == "open"} == {("GET", "/healthz"), ("GET", "/readyz")}
    server = AdminServer("127.0.0.1:0", declared, token="t0ken")
    await server.start()
    base = f"http://127.0.0.1:{server.port}"

    def ask(path: str, method: str = "GET", body: bytes = b"", token: str | None = "t0ken") -> tuple[int, str]:
        return http_get(base + path, method, body, token=token)

    try:
        assert await asyncio.to_thread(ask, "/healthz", token=None) == (200, "ok\n")
        assert await asyncio.to_thread(ask, "/readyz", token=None) == (
            503, "not ready\nworker 0: fine\nworker 1: starting\n")  # fmt: skip
        target.ready = True
        assert (await asyncio.to_thread(ask, "/readyz", token=None))[0] == 200
        assert (await asyncio.to_thread(ask, "/status", token=None))[0] == 401
        assert await asyncio.to_thread(ask, "/status") == (200, '{\n  "ready": true\n}\n')
        assert await asyncio.to_thread(ask, "/metrics") == (200, "# scripted\nx_total 1.0\n")
        assert await asyncio.to_thread(ask, "/reload", "POST") == (400, "reload incomplete\nworker 1: 400\n")
        assert (await asyncio.to_thread(ask, "/promote?route=r", "POST"))[0] == 400  # usage
        status, body = await asyncio.to_thread(ask, "/promote?route=r&shadow=nope", "POST")
        assert (status, body.startswith("not promoted: ")) == (404, True)
        assert (await asyncio.to_thread(ask, "/promote?route=r&shadow=s", "POST"))[0] == 409
        assert await asyncio.to_thread(ask, "/promote?route=r&shadow=s&force=yes", "POST") == (
            200, "route r: primary is now s\n")  # fmt: skip
        status, body = await asyncio.to_thread(ask, "/outcomes", "POST", b"[1, 2]")
        assert (status, body.startswith("bad outcomes: ")) == (400, True)
        body_ok = b'{"outcomes": [{"request_id": "a", "labels": ["1"]}]}'
        assert await asyncio.to_thread(ask, "/outcomes", "POST", body_ok) == (200, '{\n  "matched": 1\n}\n')
        assert (await asyncio.to_thread(ask, "/healthz", "POST", token=None))[0] == 405  # open path, wrong method
        # /outcomes checks its own credentials (the admin or the feedback token): the server lets it through.
        assert (await asyncio.to_thread(ask, "/outcomes", "POST", body_ok, token=None))[0] == 200
        assert target.asked == [
            "reload",
            ("r", "nope", False),
            ("r", "s", False),
            ("r", "s", True),
            [("a", [], ["1"])],
            [("a", [], ["1"])],
        ]
    finally:
        await server.close()

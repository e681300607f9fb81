"""``mlmirror promote ROUTE SHADOW`` against a running proxy: route and shadow names reach the admin endpoint as
given, whatever characters they hold (spaces, ``&``, ``=``, ``/``, ``#``, ``+``, ``%``, ``;``, non-ASCII)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.support import REPO, model_server, running_proxy

pytestmark = pytest.mark.slow

ROUTE = "iris & co=1/2 #a+b %41;c é"
PRIMARY = "prod 1/a"
SHADOW = "cand & x=/y?z+%20;é"


def promote(admin: str, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlmirror", "promote", *names, "--force", "--admin", admin],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip


async def test_promote_sends_names_with_reserved_characters_intact():
    async with model_server("production") as production, model_server("candidate") as candidate:
        config = f"""
        upstreams: {{{json.dumps(PRIMARY)}: 127.0.0.1:{production}, {json.dumps(SHADOW)}: 127.0.0.1:{candidate}}}
        routes:
          - name: {json.dumps(ROUTE)}
            match: {{model: iris}}
            primary: {json.dumps(PRIMARY)}
            shadows: [{{upstream: {json.dumps(SHADOW)}}}]
        """
        async with running_proxy(config) as proxy:
            admin = f"127.0.0.1:{proxy.admin_port}"
            unknown = await asyncio.to_thread(promote, admin, ROUTE, SHADOW + "x")
            assert unknown.returncode == 1
            assert f"route {ROUTE!r} has no shadow {SHADOW + 'x'!r}" in unknown.stderr  # names arrived whole

            done = await asyncio.to_thread(promote, admin, ROUTE, SHADOW)
            assert done.returncode == 0, done.stderr
            assert f"route {ROUTE}: primary is now {SHADOW} (was {PRIMARY}, now shadow)" in done.stdout
            route = proxy.status()["routes"][0]
            assert (route["name"], route["primary"]) == (ROUTE, SHADOW)
            assert [s["name"] for s in route["shadows"]] == [PRIMARY]

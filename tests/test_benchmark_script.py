"""The benchmark script runs end to end (tiny sizes: this checks that it works, not how fast anything is)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow


def test_bench_proxy_prints_its_table():
    assert shutil.which("h2load") is not None, "h2load (Debian package nghttp2-client) is needed; .ci/run installs it"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_proxy", "--rounds", "1", "--calls", "200", "--rate", "200",
         "--saturation-calls", "300", "--warmup", "50"],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
    assert names == [
        "direct (the model server)",
        "floor: grpc.aio pass-through (asyncio)",
        "floor: grpc.aio pass-through (uvloop)",
        "transparent floor: + metadata, deadline, trailers (uvloop)",
        "mlmirror (fallback configured)",
    ]
    mlmirror = rows[-1].split(" | ")
    assert float(mlmirror[1]) > 0  # throughput
    assert mlmirror[4].split(" ")[0].isdigit()  # CPU µs per call


def test_the_floor_proxy_relays_calls_transparently_when_asked():
    # The transparent floor must really pass statuses through, or the comparison would flatter it.
    script = """
import asyncio, grpc, subprocess, sys, socket, time
from loadtest.ports import free_port, wait_for_port
from tests.support import EchoServer

async def main():
    async with EchoServer("a") as echo:
        port = free_port()
        floor = subprocess.Popen([sys.executable, "-m", "loadtest.floor_proxy", f"127.0.0.1:{port}", echo.address,
                                  "--transparent"])
        try:
            await asyncio.to_thread(wait_for_port, port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ok = await channel.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-test-initial", "i"),))
                try:
                    await channel.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-test-code", "ABORTED"),))
                except grpc.aio.AioRpcError as error:
                    print(ok, error.code().name, dict(error.trailing_metadata())["x-trailer"])
        finally:
            floor.terminate()
            floor.wait()

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'a:x' ABORTED a"

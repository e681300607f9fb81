"""Micro-benchmark: the observer's CPU per call Envoy hands it, over ext_proc or through Envoy's tap filter.

    python -m loadtest.bench_extproc [--rate 400] [--calls 6000] [--rounds 3]

Envoy (``--concurrency 1``) runs in front of the demo ``production`` model server, and mlmirror in
``mode: observer`` (``mlmirror serve``: supervisor, worker, observing process; drift engine on the route, windows
of 1000 calls) watches. The variants:

- ``nothing observed``: envoy/dataplane.yaml without its ext_proc filter (Envoy forwarding and mirroring), for
  Envoy's own cost;
- ``five messages``: ext_proc with request headers, request body, response headers, response body, response
  trailers (the data plane as it was);
- ``dataplane.yaml``: the file as it is (ext_proc, request headers skipped, attributes instead);
- ``dataplane-tap.yaml``: Envoy's tap filter, read in batches by a second mlmirror (``envoy_tap`` at its
  defaults) from Envoy's admin.

Per round and variant (rounds interleave the variants): warm-up, then ``--calls`` calls at ``--rate`` calls/s over
4 connections (h2load); the observer's CPU time (user + system, all threads of its process tree, from /proc)
divided by the calls it observed in that time, and Envoy's CPU per call. The tap's batches arrive up to ``flush``
late, so its counts and clocks are read once the last batch is in. Medians over rounds (range).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlmirror.config.schema_process import EnvoyTap

from .envoy import DATAPLANE, DATAPLANE_TAP, EXT_PROC_FILTER, load, mirror_only, on_ports, running_envoy
from .h2load import ProcessCPU, run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import metric_samples, total, wait_attached
from .systems import MODEL_INFER, print_report, request_file

__all__ = ["VARIANTS", "main"]

NONE = "nothing observed (forward + mirror)"
FIVE = "ext_proc, five messages (request headers sent)"
FILE = "ext_proc, dataplane.yaml (four messages, attributes)"
TAP = "tap filter, dataplane-tap.yaml (batches read from Envoy's admin)"
#: ext_proc variant -> changes to the ext_proc filter's settings
EXT_PROC_VARIANTS: dict[str, dict] = {
    FIVE: {"processing_mode": {"request_header_mode": "SEND"}, "request_attributes": [], "response_attributes": []},
    FILE: {},
}
VARIANTS = (NONE, FIVE, FILE, TAP)
_TAP_FLUSH = EnvoyTap.__dataclass_fields__["flush"].default  # seconds: the tap's batches arrive this late at most


def ext_proc_variant(config: dict, changes: dict) -> dict:
    """A copy of data-plane ``config`` with its ext_proc filter's settings updated by ``changes`` (nested dicts
    are merged one level deep)."""
    config = copy.deepcopy(config)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    settings = next(f for f in manager["http_filters"] if f["name"] == EXT_PROC_FILTER)["typed_config"]
    for key, value in changes.items():
        if isinstance(value, dict):
            settings.setdefault(key, {}).update(value)
        else:
            settings[key] = value
    return config


def _observer_config(path: Path, listen: int, admin: int, production: int, drift: bool = True,
                     envoy_admin: int | None = None) -> None:  # fmt: skip
    watch = "\n    drift: {window: 1000, capture: 1000}" if drift else ""
    tap = f"envoy_tap: {{admin: 127.0.0.1:{envoy_admin}}}\n" if envoy_admin is not None else ""
    path.write_text(f"""mode: observer
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
{tap}upstreams: {{production: 127.0.0.1:{production}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production{watch}
""")


def _observed(admin: int, tap: bool = False) -> float:
    return total(metric_samples(admin), "mlmirror_envoy_tap_traces_total" if tap else "mlmirror_extproc_streams_total")


def _envoy_config(name: str, dataplane: dict, tapped: dict, listen: int, tap_admin: int, ports: dict) -> dict:
    if name == TAP:
        return on_ports(tapped, listen, tap_admin, ports)
    if name == NONE:
        return on_ports(mirror_only(dataplane), listen, free_port(), ports)
    return on_ports(ext_proc_variant(dataplane, EXT_PROC_VARIANTS[name]), listen, free_port(), ports)


def run(args: argparse.Namespace, command: str) -> str:
    observer_us: dict[str, list[float]] = {name: [] for name in VARIANTS}
    envoy_us: dict[str, list[float]] = {name: [] for name in VARIANTS}
    shares: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, args.batch)
        production, observer, admin, tap_admin = free_port(), free_port(), free_port(), free_port()
        tap_watcher_admin = free_port()
        _observer_config(folder / "observer.yaml", observer, admin, production, not args.no_drift)
        _observer_config(folder / "tap.yaml", free_port(), tap_watcher_admin, production, not args.no_drift, tap_admin)
        dataplane, tapped = load(DATAPLANE), load(DATAPLANE_TAP)
        with (
            python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{production}", "--model",
                           "production"),
            python_process("-m", "mlmirror", "serve", "--config", str(folder / "observer.yaml")) as watcher,
            python_process("-m", "mlmirror", "serve", "--config", str(folder / "tap.yaml")) as tap_watcher,
        ):  # fmt: skip
            wait_for_port(production)
            wait_for_port(admin)
            wait_for_port(tap_watcher_admin)
            for round_ in range(args.rounds):
                shift = round_ % len(VARIANTS)
                for name in VARIANTS[shift:] + VARIANTS[:shift]:
                    listen = free_port()
                    ports = {"production": [production], "shadow": [production], "mlmirror_observer": [observer]}
                    config = _envoy_config(name, dataplane, tapped, listen, tap_admin, ports)
                    tap = name == TAP
                    who, where = (tap_watcher, tap_watcher_admin) if tap else (watcher, admin)
                    settle = _TAP_FLUSH + 1.0 if tap else 0.0
                    with running_envoy(config, folder, concurrency=1) as envoy:
                        if tap:
                            wait_attached(where)
                        run_h2load(listen, MODEL_INFER, body, calls=args.warmup, connections=4, rate=args.rate)
                        time.sleep(settle)
                        clocks = ProcessCPU(who.pid, tree=True), ProcessCPU(envoy.pid)
                        before = [clock.seconds() for clock in clocks]
                        seen = _observed(where, tap)
                        fixed = run_h2load(listen, MODEL_INFER, body, calls=args.calls, connections=4, rate=args.rate)
                        envoy_seconds = clocks[1].seconds() - before[1]
                        time.sleep(settle)
                        streams = _observed(where, tap) - seen
                        observer_seconds = clocks[0].seconds() - before[0]
                    if name != NONE:
                        observer_us[name].append(observer_seconds / max(streams, 1) * 1e6)
                        shares[name].append(streams / max(fixed.calls, 1))
                    envoy_us[name].append(envoy_seconds / max(fixed.calls, 1) * 1e6)
                    print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)

    def fmt(values: list[float], spec: str = ".0f") -> str:
        return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"

    lines = [
        f"`{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features; {args.calls} calls per round at {args.rate:g} calls/s "
        f"over 4 connections; {args.rounds} interleaved rounds; Envoy --concurrency 1; the observer's CPU is that of "
        f"its whole process tree, and it {'only counts calls' if args.no_drift else 'runs the drift engine'}. "
        "Medians over rounds (range).",
        "",
        "| variant | observer CPU per observed call (µs) | Envoy CPU per call (µs) | calls observed per call |",
        "|---|---:|---:|---:|",
    ]
    for name in VARIANTS:
        observed = (fmt(observer_us[name]), fmt(shares[name], ".3f")) if observer_us[name] else ("-", "-")
        lines.append(f"| {name} | {observed[0]} | {fmt(envoy_us[name])} | {observed[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_extproc", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=400.0, help="calls/s (default 400)")
    parser.add_argument("--calls", type=int, default=6000, help="measured calls per round and variant")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="rows per ModelInfer request")
    parser.add_argument("--no-drift", action="store_true", help="the observer only counts (no drift engine)")
    args = parser.parse_args(argv)
    return print_report("bench_extproc", run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

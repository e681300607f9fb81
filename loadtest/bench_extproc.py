"""Micro-benchmark: the observer's CPU per call Envoy streams to it over ext_proc, by what the data plane sends.

    python -m loadtest.bench_extproc [--rate 400] [--calls 6000] [--rounds 3]

Envoy (``--concurrency 1``) runs envoy/dataplane.yaml in front of the demo ``production`` model server, and
mlmirror in ``mode: observer`` (drift engine on the route, windows of 1000 calls) watches through ext_proc. Each
variant changes only the ext_proc filter's processing mode:

- ``five messages``: request headers, request body, response headers, response body, response trailers (the
  data plane as it was);
- ``dataplane.yaml``: the file as it is (request headers skipped, attributes instead);

Per round and variant (rounds interleave the variants): warm-up, then ``--calls`` calls at ``--rate`` calls/s over
4 connections (h2load); the observer's CPU time (user + system, all threads, from /proc) divided by the streams it
observed in that time, and Envoy's CPU per call. Medians over rounds (range).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

from .envoy import DATAPLANE, EXT_PROC_FILTER, load, on_ports, running_envoy
from .h2load import ProcessCPU, run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import metric_samples, total
from .systems import MODEL_INFER, print_report, request_file

__all__ = ["VARIANTS", "main"]

FIVE = "five messages (request headers sent)"
FILE = "dataplane.yaml (four messages, attributes)"
#: variant -> changes to the ext_proc filter's settings
VARIANTS: dict[str, dict] = {
    FIVE: {"processing_mode": {"request_header_mode": "SEND"}, "request_attributes": [], "response_attributes": []},
    FILE: {},
}


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


def _observer_config(path: Path, listen: int, admin: int, production: int, drift: bool = True) -> None:
    watch = "\n    drift: {window: 1000, capture: 1000}" if drift else ""
    path.write_text(f"""mode: observer
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
upstreams: {{production: 127.0.0.1:{production}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production{watch}
""")


def _observed(admin: int) -> float:
    return total(metric_samples(admin), "mlmirror_extproc_streams_total")


def run(args: argparse.Namespace, command: str) -> str:
    observer_us: dict[str, list[float]] = {name: [] for name in VARIANTS}
    envoy_us: dict[str, list[float]] = {name: [] for name in VARIANTS}
    shares: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, args.batch)
        production, observer, admin = free_port(), free_port(), free_port()
        _observer_config(folder / "observer.yaml", observer, admin, production, not args.no_drift)
        dataplane = load(DATAPLANE)
        with (
            python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{production}", "--model",
                           "production"),
            python_process("-m", "mlmirror", "serve", "--config", str(folder / "observer.yaml")) as watcher,
        ):  # fmt: skip
            wait_for_port(production)
            wait_for_port(admin)
            for round_ in range(args.rounds):
                names = list(VARIANTS)
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    listen = free_port()
                    config = on_ports(ext_proc_variant(dataplane, VARIANTS[name]), listen, free_port(),
                                      {"production": [production], "shadow": [production],
                                       "mlmirror_observer": [observer]})  # fmt: skip
                    with running_envoy(config, folder, concurrency=1) as envoy:
                        run_h2load(listen, MODEL_INFER, body, calls=args.warmup, connections=4, rate=args.rate)
                        clocks = ProcessCPU(watcher.pid), ProcessCPU(envoy.pid)
                        before = [clock.seconds() for clock in clocks]
                        seen = _observed(admin)
                        fixed = run_h2load(listen, MODEL_INFER, body, calls=args.calls, connections=4, rate=args.rate)
                        streams = _observed(admin) - seen
                        after = [clock.seconds() for clock in clocks]
                    observer_us[name].append((after[0] - before[0]) / max(streams, 1) * 1e6)
                    envoy_us[name].append((after[1] - before[1]) / max(fixed.calls, 1) * 1e6)
                    shares[name].append(streams / max(fixed.calls, 1))
                    print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)

    def fmt(values: list[float], spec: str = ".0f") -> str:
        return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"

    lines = [
        f"`{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features; {args.calls} calls per round at {args.rate:g} calls/s "
        f"over 4 connections; {args.rounds} interleaved rounds; Envoy --concurrency 1; the observer "
        f"{'only counts calls' if args.no_drift else 'runs the drift engine'}. Medians over rounds (range).",
        "",
        "| ext_proc variant | observer CPU per observed call (µs) | Envoy CPU per call (µs) | streams per call |",
        "|---|---:|---:|---:|",
    ]
    for name in VARIANTS:
        lines.append(f"| {name} | {fmt(observer_us[name])} | {fmt(envoy_us[name])} | {fmt(shares[name], '.3f')} |")
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

"""Benchmark: mlmirror's two modes against Envoy's own forwarding and mirroring, side by side.

    python -m loadtest.bench_envoy [--rate 400] [--calls 8000] [--saturation-calls 10000] [--rounds 3] [--out DIR]

Systems, each in front of the same demo ``production`` model server (and, where they mirror, the same ``candidate``
shadow model server), all separate processes:

- direct: the model server itself;
- mlmirror proxy, and mlmirror proxy mirroring 100% of calls to one shadow (with comparison);
- Envoy forwarding only, and Envoy forwarding plus one mirror (``request_mirror_policies``): the anchors, made from
  envoy/dataplane.yaml by taking features out (loadtest/envoy.py);
- the data plane: envoy/dataplane.yaml as is (forward, mirror, ext_proc in observability mode) feeding mlmirror in
  ``mode: observer`` with a drift engine on the route (windows of 1000 calls);
- the tap data plane: envoy/dataplane-tap.yaml (forward, mirror, the tap filter) read in batches by mlmirror in
  ``mode: observer`` with ``envoy_tap`` at its defaults, the same drift engine.

Envoy runs with ``--concurrency 1`` (one worker thread), like mlmirror's one event loop. Per round and system
(rounds interleave the systems): warm-up calls, then ``--calls`` calls at ``--rate`` calls/s over 4 connections
(h2load), giving the latency distribution and each measured process's CPU time per call (user + system, all
threads, from /proc), then ``--saturation-calls`` as fast as answers come (4 connections x 8 streams) for the
throughput. A data plane's CPU is Envoy's plus the observer's (its whole process tree). Each system's fixed-rate
calls are written as a ghz-format report (``--out``), and the table is ``python -m loadtest compare`` of those
reports; after it, what the observers saw of the calls Envoy carried.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path

from prometheus_client.samples import Sample

from .envoy import DATAPLANE, DATAPLANE_TAP, forward_only, load, mirror_only, on_ports, running_envoy
from .ghz import compare
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import by_label, metric_samples, total, wait_attached
from .systems import Load, System, add_load_arguments, failed_lines, ghz_report, print_report, request_file, rounds

DIRECT = "direct (the model server)"
MLMIRROR = "mlmirror proxy"
MLMIRROR_SHADOW = "mlmirror proxy + 1 shadow (compared)"
ENVOY = "Envoy, forward only"
ENVOY_MIRROR = "Envoy + 1 mirror"
DATA_PLANE = "Envoy + 1 mirror + ext_proc to mlmirror observer (drift)"
DATA_PLANE_TAP = "Envoy + 1 mirror + tap read by mlmirror observer (drift)"
SYSTEMS = (DIRECT, MLMIRROR, MLMIRROR_SHADOW, ENVOY, ENVOY_MIRROR, DATA_PLANE, DATA_PLANE_TAP)
#: per data plane: the observer's counter of calls by outcome, and how long it may sit still between two batches (s)
_OUTCOMES = {
    DATA_PLANE: ("mlmirror_extproc_streams_total", 0.5),
    DATA_PLANE_TAP: ("mlmirror_envoy_tap_traces_total", 3.0),
}


def _settled_samples(admin: int, counter: str, still: float, within: float = 30.0) -> list[Sample]:
    """The observer's metrics once no ext_proc stream is open and its ``counter`` of observed calls has not moved
    for ``still`` seconds."""
    deadline = time.monotonic() + within
    previous = None
    while True:
        samples = metric_samples(admin)
        observed = by_label(samples, counter, "outcome").get("observed")
        active = total(samples, "mlmirror_extproc_active_streams")
        settled = observed is not None and observed == previous and not active  # None: the worker did not answer
        if settled or time.monotonic() > deadline:
            return samples
        previous = observed
        time.sleep(still)


def observer_table(systems: list[System], admins: dict[str, int]) -> list[str]:
    """What each data plane's observer saw of the calls Envoy carried to its production model."""
    lines = [
        "| data plane | calls Envoy carried | calls observed | share | other outcomes | drift engine calls | "
        "drift engine dropped |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for system in systems:
        counter, still = _OUTCOMES[system.name]
        samples = _settled_samples(admins[system.name], counter, still)
        outcomes = by_label(samples, counter, "outcome")
        drift_calls = total(samples, "mlmirror_drift_calls_total")
        dropped = total(samples, "mlmirror_drift_dropped_total")
        observed = outcomes.get("observed", 0.0)
        share = observed / system.sent if system.sent else 0.0
        others = ", ".join(f"{k} {v:.0f}" for k, v in sorted(outcomes.items()) if k != "observed" and v) or "none"
        lines.append(f"| {system.name} | {system.sent} | {observed:.0f} | {share:.1%} | {others} | {drift_calls:.0f} "
                     f"| {dropped:.0f} |")  # fmt: skip
    return lines


def _configs(folder: Path, ports: dict[str, int]) -> dict[str, Path]:
    production, candidate = f"127.0.0.1:{ports['production']}", f"127.0.0.1:{ports['candidate']}"
    texts = {
        MLMIRROR: f"""listen: 127.0.0.1:{ports["mlmirror"]}
admin: 127.0.0.1:{free_port()}
upstreams: {{production: {production}}}
routes: [{{name: iris, match: {{model: iris}}, primary: production}}]
""",
        MLMIRROR_SHADOW: f"""listen: 127.0.0.1:{ports["mlmirror_shadow"]}
admin: 127.0.0.1:{free_port()}
mirror_shed_lag: off
upstreams: {{production: {production}, candidate: {candidate}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows: [{{upstream: candidate}}]
    compare: {{classification: argmax, output: probabilities}}
""",
        DATA_PLANE: f"""mode: observer
listen: 127.0.0.1:{ports["observer"]}
admin: 127.0.0.1:{ports["observer_admin"]}
upstreams: {{production: {production}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    drift: {{window: 1000, capture: 1000}}
""",
        DATA_PLANE_TAP: f"""mode: observer
listen: 127.0.0.1:{free_port()}
admin: 127.0.0.1:{ports["tap_observer_admin"]}
envoy_tap: {{admin: 127.0.0.1:{ports["tap_envoy_admin"]}}}
upstreams: {{production: {production}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    drift: {{window: 1000, capture: 1000}}
""",
    }
    paths = {}
    for i, (name, text) in enumerate(texts.items()):
        paths[name] = folder / f"mlmirror-{i}.yaml"
        paths[name].write_text(text)
    return paths


def run(args: argparse.Namespace, command: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, args.batch)
        names = ("production", "candidate", "mlmirror", "mlmirror_shadow", "observer", "observer_admin", "envoy",
                 "envoy_mirror", "dataplane", "dataplane_tap", "tap_envoy_admin", "tap_observer_admin")  # fmt: skip
        ports = {name: free_port() for name in names}
        configs = _configs(folder, ports)
        dataplane = load(DATAPLANE)
        clusters = {"production": [ports["production"]], "shadow": [ports["candidate"]]}
        envoys = {
            ENVOY: on_ports(forward_only(dataplane), ports["envoy"], free_port(), clusters),
            ENVOY_MIRROR: on_ports(mirror_only(dataplane), ports["envoy_mirror"], free_port(), clusters),
            DATA_PLANE: on_ports(dataplane, ports["dataplane"], free_port(),
                                 {**clusters, "mlmirror_observer": [ports["observer"]]}),
            DATA_PLANE_TAP: on_ports(load(DATAPLANE_TAP), ports["dataplane_tap"], ports["tap_envoy_admin"], clusters),
        }  # fmt: skip
        model = ("-m", "mlmirror", "model-server", "--listen")
        with contextlib.ExitStack() as stack:
            stack.enter_context(python_process(*model, f"127.0.0.1:{ports['production']}", "--model", "production"))
            stack.enter_context(python_process(*model, f"127.0.0.1:{ports['candidate']}", "--model", "candidate"))
            pids = {name: stack.enter_context(python_process("-m", "mlmirror", "serve", "--config", str(path))).pid
                    for name, path in configs.items()}  # fmt: skip
            for name in ("production", "candidate", "mlmirror", "mlmirror_shadow", "observer", "observer_admin",
                         "tap_observer_admin"):  # fmt: skip
                wait_for_port(ports[name])
            envoy_pids = {name: stack.enter_context(running_envoy(config, folder, concurrency=1)).pid
                          for name, config in envoys.items()}  # fmt: skip
            systems = [
                System(DIRECT, ports["production"]),
                System(MLMIRROR, ports["mlmirror"], {"mlmirror": pids[MLMIRROR]}),
                System(MLMIRROR_SHADOW, ports["mlmirror_shadow"], {"mlmirror": pids[MLMIRROR_SHADOW]}),
                System(ENVOY, ports["envoy"], {"envoy": envoy_pids[ENVOY]}),
                System(ENVOY_MIRROR, ports["envoy_mirror"], {"envoy": envoy_pids[ENVOY_MIRROR]}),
                System(DATA_PLANE, ports["dataplane"], {"envoy": envoy_pids[DATA_PLANE], "observer": pids[DATA_PLANE]}),
                System(DATA_PLANE_TAP, ports["dataplane_tap"],
                       {"envoy": envoy_pids[DATA_PLANE_TAP], "observer": pids[DATA_PLANE_TAP]}),
            ]  # fmt: skip
            wait_attached(ports["tap_observer_admin"])
            rounds(systems, body, Load(args.warmup, args.calls, args.rate, args.saturation_calls), args.rounds)
            observed = observer_table(systems[-2:], {DATA_PLANE: ports["observer_admin"],
                                                     DATA_PLANE_TAP: ports["tap_observer_admin"]})  # fmt: skip
    reports = [ghz_report(system) for system in systems]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for result in reports:
            slug = re.sub(r"[^a-z0-9]+", "-", result["name"].lower()).strip("-")
            (args.out / f"{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features; fixed load {args.rate:g} calls/s x {args.calls} calls "
        f"per round; saturation: {args.saturation_calls} calls over 4 connections x 8 streams; {args.rounds} "
        "interleaved rounds; Envoy --concurrency 1. Latencies over all rounds' fixed-rate calls; CPU and "
        "saturation are medians over rounds.",
        "",
        compare(reports),
        "",
        *observed,
        *failed_lines(systems),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, saturation_calls=10000)
    parser.add_argument("--out", type=Path, help="write each system's ghz-format report into this folder")
    args = parser.parse_args(argv)
    return print_report("bench_envoy", run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: ``serve --single-process`` against ``serve --workers 2``, without and with observers (shadow + drift).

    python -m loadtest.bench_workers [--rate 400] [--calls 8000] [--saturation-calls 12000] [--rounds 3]

Four groups in front of the same demo ``production`` model server (and ``candidate`` shadow model server):

- one process (``--single-process``), plain relay; ``--workers 2``, plain relay;
- one process with one shadow at 100% (compared) and the drift engine (windows of 1000 calls); ``--workers 2``
  with the same routes, where the workers hand the calls to the observing process, which makes the copies and runs
  the engine.

Per round and group (rounds interleave the groups): warm-up, ``--calls`` at ``--rate`` calls/s over 8 connections
(production latency, and CPU time per call of every process of the group: the lone process, or the observing
process and each worker), then ``--saturation-calls`` as fast as answers come over 16 connections x 4 streams
(throughput; 16 connections so that the kernel's SO_REUSEPORT hash spreads them over both workers). Every process —
h2load, model servers, proxies — shares this machine's cores, so throughput at saturation is bounded by the whole
machine, not by mlmirror alone; the CPU per call is what says where the work went.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from .ghz import compare
from .ports import free_port, wait_for_port
from .processes import python_process
from .systems import Load, System, add_load_arguments, failed_lines, ghz_report, print_report, request_file, rounds

ALONE = "1 process"
WORKERS = "--workers 2"
ALONE_WATCHED = "1 process, shadow + drift"
WORKERS_WATCHED = "--workers 2, shadow + drift"
GROUPS = (ALONE, WORKERS, ALONE_WATCHED, WORKERS_WATCHED)


def _config(path: Path, listen: int, admin: int, production: int, candidate: int, watched: bool) -> None:
    observers = """
    shadows: [{upstream: candidate}]
    compare: {classification: argmax, output: probabilities}
    drift: {window: 1000, capture: 1000}""" if watched else ""  # fmt: skip
    path.write_text(f"""listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
upstreams: {{production: 127.0.0.1:{production}, candidate: 127.0.0.1:{candidate}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production{observers}
""")


def _group_pids(admin: int, within: float = 60.0) -> dict[str, int]:
    """Label -> pid of the serving workers and the observing process of a group, once its admin lists them ready
    (the supervisor, which only serves the admin endpoint, is left out)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as response:
                status = json.load(response)
            if status.get("ready"):
                return {"observer": status["observer"]["pid"],
                        **{f"worker {w['index']}": w["pid"] for w in status["workers"]}}  # fmt: skip
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the group on admin port {admin} did not get ready")
        time.sleep(0.5)


def run(args: argparse.Namespace, command: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, args.batch)
        backends = {"production": free_port(), "candidate": free_port()}
        ports = {name: (free_port(), free_port()) for name in GROUPS}
        model = ("-m", "mlmirror", "model-server", "--listen")
        systems = []
        with contextlib.ExitStack() as stack:
            for name, port in backends.items():
                stack.enter_context(python_process(*model, f"127.0.0.1:{port}", "--model", name))
            for port in backends.values():
                wait_for_port(port)
            for name in GROUPS:
                listen, admin = ports[name]
                config = folder / f"{len(systems)}.yaml"
                _config(config, listen, admin, backends["production"], backends["candidate"], "shadow" in name)
                workers = ["--workers", "2"] if name.startswith("--workers") else ["--single-process"]
                process = stack.enter_context(python_process("-m", "mlmirror", "serve", "--config", str(config),
                                                             *workers))  # fmt: skip
                wait_for_port(listen, 60)
                grouped = workers[0] == "--workers"
                pids = _group_pids(admin) if grouped else {"mlmirror": process.pid}
                systems.append(System(name, listen, pids))
            load = Load(args.warmup, args.calls, args.rate, args.saturation_calls, connections=8,
                        saturation_connections=16, streams=4)  # fmt: skip
            rounds(systems, body, load, args.rounds)
    reports = [ghz_report(system) for system in systems]
    by_name = {r["name"]: r for r in reports}
    lines = [
        f"`{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features; fixed load {args.rate:g} calls/s x {args.calls} calls "
        f"over 8 connections per round; saturation: {args.saturation_calls} calls over 16 connections x 4 streams; "
        f"{args.rounds} interleaved rounds. CPU per call: medians over rounds, per process of the group.",
        "",
        compare(reports),
        "",
        "| from 1 process to --workers 2 | saturation throughput | CPU per call, whole group | CPU per call, workers |",
        "|---|---:|---:|---:|",
    ]
    for one, two in ((ALONE, WORKERS), (ALONE_WATCHED, WORKERS_WATCHED)):
        a, b = by_name[one], by_name[two]
        workers_cpu = sum(v for k, v in b.get("cpuBreakdown", {}).items() if k.startswith("worker"))
        lines.append(
            f"| {one} → {two} | {b['saturationRps'] / a['saturationRps']:.2f}x | "
            f"{b['cpuPerCallMicros'] / a['cpuPerCallMicros']:.2f}x | "
            f"{workers_cpu / a['cpuPerCallMicros']:.2f}x |"
        )
    return "\n".join([*lines, *failed_lines(systems)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, saturation_calls=12000)
    args = parser.parse_args(argv)
    return print_report("bench_workers", run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

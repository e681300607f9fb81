"""Benchmark: mlmirror against calling the model directly and against the simplest grpc.aio pass-through proxy.

    python -m loadtest.bench_proxy [--rate 400] [--calls 8000] [--rounds 3] [--saturation-calls 20000]

Every system forwards to the same backend (the demo production model, a KServe V2 server in its own process) and
is driven by the same load generator (h2load) with the same request (a framed ModelInferRequest). Systems:

- direct: the model server itself;
- floor (asyncio), floor (uvloop): ``loadtest/floor_proxy.py``, a dozen-line grpc.aio pass-through;
- transparent floor: the same with only what transparency requires (metadata, deadline, status, trailers);
- mlmirror: ``mlmirror serve`` with a fallback upstream configured (the default shape: a supervisor, one serving
  worker and the observing process; its CPU is also given by process), and the same config with
  ``--single-process`` (one process relays and would observe).

Per system and round, at a fixed offered load (``--rate``): latency p50/p99 and the proxy process's CPU time per
call (user + system, all threads, from /proc); then, closed loop, throughput at saturation. Rounds interleave the
systems so that drift in the machine's state hits all alike; the table shows medians over rounds. The run fails if
mlmirror answered any call with a status other than OK.

CPU time on a shared 2-core machine varies by 10-20% from run to run, so the table gives the median and the range
over rounds, and compares systems by the median of per-round ratios (systems measured back to back in a round see
the same machine).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.protocol.names import MODEL_INFER

from .bench_workers import _group_pids
from .h2load import ProcessCPU, grpc_frame, run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import by_label, metric_samples


@dataclass
class System:
    name: str
    port: int
    pid: int | None  # the process whose CPU is measured; None: nothing between client and model
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    saturated_rate: list[float] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # label -> pid of each process of a group (mlmirror serve)
    parts_cpu_us: dict[str, list[float]] = field(default_factory=dict)  # label -> CPU per call, each round


def _measure(system: System, body: Path, args: argparse.Namespace) -> None:
    run_h2load(system.port, MODEL_INFER, body, calls=args.warmup, connections=4, streams=4)
    cpu = ProcessCPU(system.pid, tree=True) if system.pid else None
    parts = {label: ProcessCPU(pid) for label, pid in system.parts.items()}
    before = cpu.seconds() if cpu else 0.0
    parts_before = {label: part.seconds() for label, part in parts.items()}
    fixed = run_h2load(system.port, MODEL_INFER, body, calls=args.calls, connections=4, rate=args.rate)
    if cpu:
        system.cpu_us.append((cpu.seconds() - before) / fixed.calls * 1e6)
    for label, part in parts.items():
        used = (part.seconds() - parts_before[label]) / fixed.calls * 1e6
        system.parts_cpu_us.setdefault(label, []).append(used)
    if fixed.failed:
        raise RuntimeError(f"{system.name}: {fixed.failed} calls failed at the fixed rate")
    system.p50_ms.append(fixed.percentile_ms(50))
    system.p99_ms.append(fixed.percentile_ms(99))
    saturated = run_h2load(system.port, MODEL_INFER, body, calls=args.saturation_calls, connections=4, streams=8)
    system.saturated_rate.append(saturated.rate)


def _mlmirror_config(path: Path, listen: int, admin: int, backend: int, fallback: int) -> None:
    path.write_text(
        f"""listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
upstreams:
  production: {{address: 127.0.0.1:{backend}, timeout: 2s}}
  baseline: {{address: 127.0.0.1:{fallback}, timeout: 2s}}
routes:
  - {{name: iris, match: {{model: iris}}, primary: production, fallback: [baseline]}}
"""
    )


def _calls_by_code(admin: int) -> dict[str, float]:
    """Client calls the proxy answered, by the status the client got."""
    return by_label(metric_samples(admin), "mlmirror_calls_total", "grpc_code")


FLOOR_ASYNCIO = "floor: grpc.aio pass-through (asyncio)"
FLOOR_UVLOOP = "floor: grpc.aio pass-through (uvloop)"
TRANSPARENT = "transparent floor: + metadata, deadline, trailers (uvloop)"
MLMIRROR = "mlmirror (fallback configured)"
MLMIRROR_LONE = "mlmirror --single-process (the same)"


def _proxies(ports: dict[str, int], config: Path, lone: Path) -> dict[str, tuple[list[str], int]]:
    """The measured proxies: name -> (command line after the Python interpreter, listening port)."""
    backend = f"127.0.0.1:{ports['backend']}"
    floor = ["-m", "loadtest.floor_proxy"]
    return {
        FLOOR_ASYNCIO: ([*floor, f"127.0.0.1:{ports['floor']}", backend], ports["floor"]),
        FLOOR_UVLOOP: ([*floor, f"127.0.0.1:{ports['floor_uv']}", backend, "--uvloop"], ports["floor_uv"]),
        TRANSPARENT: (
            [*floor, f"127.0.0.1:{ports['transparent']}", backend, "--uvloop", "--transparent"],
            ports["transparent"],
        ),
        MLMIRROR: (["-m", "mlmirror", "serve", "--config", str(config)], ports["mlmirror"]),
        MLMIRROR_LONE: (["-m", "mlmirror", "serve", "--config", str(lone), "--single-process"], ports["lone"]),
    }


def run(args: argparse.Namespace) -> str:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "infer.bin"
        body.write_bytes(grpc_frame(infer_request(sample_features(rng, args.batch), request_id="bench-0001")))
        body_size = body.stat().st_size
        names = ("backend", "fallback", "floor", "floor_uv", "transparent", "mlmirror", "admin", "lone", "lone_admin")
        ports = {name: free_port() for name in names}
        config = Path(tmp) / "mlmirror.yaml"
        _mlmirror_config(config, ports["mlmirror"], ports["admin"], ports["backend"], ports["fallback"])
        lone = Path(tmp) / "lone.yaml"
        _mlmirror_config(lone, ports["lone"], ports["lone_admin"], ports["backend"], ports["fallback"])
        model = ("-m", "mlmirror", "model-server", "--listen")
        proxies = _proxies(ports, config, lone)
        with contextlib.ExitStack() as stack:
            stack.enter_context(python_process(*model, f"127.0.0.1:{ports['backend']}", "--model", "production"))
            stack.enter_context(python_process(*model, f"127.0.0.1:{ports['fallback']}", "--model", "baseline"))
            running = {name: stack.enter_context(python_process(*command)) for name, (command, _) in proxies.items()}
            for port in ports.values():
                wait_for_port(port)
            systems = [
                System("direct (the model server)", ports["backend"], None),
                *(System(name, port, running[name].pid) for name, (_, port) in proxies.items()),
            ]
            if args.only:
                systems = [s for s in systems if any(word in s.name for word in args.only)]
            for system in systems:
                if system.name == MLMIRROR:
                    system.parts = {"supervisor": running[MLMIRROR].pid, **_group_pids(ports["admin"])}
            for round_ in range(args.rounds):
                for system in systems:
                    _measure(system, body, args)
                    print(f"round {round_ + 1}/{args.rounds}: {system.name} done", file=sys.stderr, flush=True)
            admins = {MLMIRROR: ports["admin"], MLMIRROR_LONE: ports["lone_admin"]}
            codes = {s.name: _calls_by_code(admins[s.name]) for s in systems if s.name in admins}
    for name, by_code in codes.items():
        if set(by_code) != {"OK"}:
            raise RuntimeError(f"{name} answered calls with other statuses: {by_code}")
    return _table(systems, args, body_size)


def _table(systems: list[System], args: argparse.Namespace, body_size: int) -> str:
    med = statistics.median
    by_name = {s.name: s for s in systems}
    references = [name for name in (FLOOR_ASYNCIO, FLOOR_UVLOOP, TRANSPARENT) if name in by_name]
    lines = [
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features ({body_size} bytes framed); fixed load {args.rate:g} "
        f"calls/s x {args.calls} calls; saturation: {args.saturation_calls} calls over 4 connections x 8 streams; "
        f"{args.rounds} interleaved rounds.",
        "",
        "| system | throughput at saturation (calls/s) | p50 (ms) | p99 (ms) "
        "| proxy CPU per call, µs: median (range) | "
        + " | ".join(f"vs {name.split(':')[0]} {name.rsplit(' ', 1)[-1]}" for name in references)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(references),
    ]
    for s in systems:
        row = f"| {s.name} | {med(s.saturated_rate):.0f} | {med(s.p50_ms):.2f} | {med(s.p99_ms):.2f} | "
        if s.cpu_us:
            row += f"{med(s.cpu_us):.0f} ({min(s.cpu_us):.0f}-{max(s.cpu_us):.0f}) | "
            ratios = [med(a / b for a, b in zip(s.cpu_us, by_name[ref].cpu_us, strict=True)) for ref in references]
            row += " | ".join(f"{ratio:.3f}x" for ratio in ratios) + " |"
        else:
            row += "— | " + "— | " * len(references)
        lines.append(row.rstrip())
    for s in systems:
        if s.parts_cpu_us:
            lines += ["", f"{s.name}, CPU per call by process, µs: median (range)", "",
                      "| process | CPU per call (µs) |", "|---|---:|"]  # fmt: skip
            lines += [f"| {label} | {med(used):.0f} ({min(used):.0f}-{max(used):.0f}) |"
                      for label, used in s.parts_cpu_us.items()]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=400.0, help="fixed offered load, calls/s (default 400)")
    parser.add_argument("--calls", type=int, default=8000, help="calls per fixed-load run (default 8000)")
    parser.add_argument("--saturation-calls", type=int, default=20000, help="calls per saturation run")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up calls before each run (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--only", nargs="*", help="measure only systems whose name contains one of these words")
    args = parser.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

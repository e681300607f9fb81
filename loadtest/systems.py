"""Systems under test for the side-by-side benchmarks (bench_envoy, bench_workers): a port to call, the processes
whose CPU counts, and what one round of load measured; reported in ghz's JSON format."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.protocol.names import MODEL_INFER

from .ghz import report
from .h2load import ProcessCPU, grpc_frame, run_h2load

__all__ = ["Load", "System", "add_load_arguments", "failed_lines", "ghz_report", "measure", "request_file", "rounds"]


@dataclass(frozen=True)
class Load:
    """One round: ``warmup`` calls, ``calls`` at ``rate`` calls/s over ``connections``, then ``saturation_calls`` as
    fast as answers come over ``saturation_connections`` x ``streams``."""

    warmup: int
    calls: int
    rate: float
    saturation_calls: int
    connections: int = 4
    saturation_connections: int = 4
    streams: int = 8


def add_load_arguments(parser: argparse.ArgumentParser, saturation_calls: int) -> None:
    """The options every side-by-side benchmark takes: the load of a round, how many rounds, rows per request."""
    parser.add_argument("--rate", type=float, default=400.0, help="fixed offered load, calls/s (default 400)")
    parser.add_argument("--calls", type=int, default=8000, help="calls per fixed-load run (default 8000)")
    parser.add_argument("--saturation-calls", type=int, default=saturation_calls,
                        help=f"calls per saturation run (default {saturation_calls})")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up calls before each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="rows per ModelInfer request")


def print_report(module: str, run: Callable[[argparse.Namespace, str], str], args: argparse.Namespace,
                 argv: list[str] | None) -> int:  # fmt: skip
    """Run the benchmark ``loadtest.<module>`` and print its report, headed by the command that gives it; 0."""
    command = f"python -m loadtest.{module} " + " ".join(argv if argv is not None else sys.argv[1:])
    print(run(args, command.strip()))
    return 0


def request_file(folder: Path, rows: int) -> Path:
    """The framed ModelInfer request every call sends (``rows`` iris-like rows), written into ``folder``."""
    body = folder / "infer.bin"
    x = sample_features(np.random.default_rng(0), rows)
    body.write_bytes(grpc_frame(infer_request(x, request_id="bench-0001")))
    return body


@dataclass
class System:
    """One system under test: the port clients call and the processes whose CPU counts (label -> pid)."""

    name: str
    port: int
    pids: dict[str, int] = field(default_factory=dict)
    latencies_s: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    failed: int = 0
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    saturated: list[float] = field(default_factory=list)
    sent: int = 0


def measure(system: System, body: Path, load: Load, around_fixed: Callable[[System, str], None] | None = None) -> None:
    """One round of ``load`` on ``system``, sending ``body`` (a framed ModelInfer request). ``around_fixed`` is
    called with ``"before"`` and ``"after"`` the fixed-rate calls, and with ``"before saturation"`` and ``"after
    saturation"`` around the closed-loop ones (to read counters over them)."""
    run_h2load(system.port, MODEL_INFER, body, calls=load.warmup, connections=load.connections, streams=4)
    if around_fixed is not None:
        around_fixed(system, "before")
    clocks = {label: ProcessCPU(pid, tree=True) for label, pid in system.pids.items()}
    before = {label: clock.seconds() for label, clock in clocks.items()}
    fixed = run_h2load(system.port, MODEL_INFER, body, calls=load.calls, connections=load.connections, rate=load.rate)
    for label, clock in clocks.items():
        system.cpu_us.setdefault(label, []).append((clock.seconds() - before[label]) / max(fixed.calls, 1) * 1e6)
    if around_fixed is not None:
        around_fixed(system, "after")
    system.latencies_s.append(fixed.latencies_us / 1e6)
    system.seconds += fixed.seconds
    system.failed += fixed.failed
    if around_fixed is not None:
        around_fixed(system, "before saturation")
    saturated = run_h2load(system.port, MODEL_INFER, body, calls=load.saturation_calls,
                           connections=load.saturation_connections, streams=load.streams)  # fmt: skip
    if around_fixed is not None:
        around_fixed(system, "after saturation")
    system.failed += saturated.failed
    system.saturated.append(saturated.rate)
    system.sent += load.warmup + load.calls + load.saturation_calls


def ghz_report(system: System) -> dict:
    """The system's fixed-rate calls (all rounds) as a ghz-format report, with CPU and saturation added."""
    latencies = np.concatenate(system.latencies_s) if system.latencies_s else np.zeros(0)
    codes = Counter({"OK": int(latencies.size)})
    if system.failed:
        codes["failed"] = system.failed
    result = report(system.name, latencies.tolist(), codes, Counter(), system.seconds)
    result["generator"] = "h2load"
    result["saturationRps"] = statistics.median(system.saturated) if system.saturated else 0.0
    if system.cpu_us:
        breakdown = {label: statistics.median(values) for label, values in system.cpu_us.items()}
        result["cpuPerCallMicros"] = sum(breakdown.values())
        if len(breakdown) > 1:
            result["cpuBreakdown"] = breakdown
    return result


def rounds(
    systems: list[System], body: Path, load: Load, count: int, around_fixed: Callable[[System, str], None] | None = None
) -> None:
    """``count`` rounds of ``load`` on every system, in an order rotated each round; progress on stderr."""
    for round_ in range(count):
        shift = round_ % len(systems)
        for system in systems[shift:] + systems[:shift]:
            measure(system, body, load, around_fixed)
            print(f"round {round_ + 1}/{count}: {system.name} done", file=sys.stderr, flush=True)


def failed_lines(systems: list[System]) -> list[str]:
    """A closing line naming the systems where calls failed, if any did."""
    failed = {s.name: s.failed for s in systems if s.failed}
    return ["", f"failed calls: {failed}"] if failed else []

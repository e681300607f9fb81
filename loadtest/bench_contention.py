"""Benchmark: what other work on the serving machine costs production whatever its CPU priority, the floor under
the observing side's targets.

    python -m loadtest.bench_contention [--rounds 3] [--calls 6000] [--saturation-calls 8000] [--share 0.35]
        [--variants 'NAME;...']

``mlmirror serve --workers 1`` with nothing watched, in front of the demo production model (FP32 [8, 4] requests),
beside one of these CPU burners, which touch neither mlmirror nor the model:

- none;
- ``idle, duty``: a loop that computes for ``--burst`` µs, then sleeps, so that it uses ``--share`` of one CPU when
  it runs freely (the observing process's share at half load is about 0.3-0.4 on this machine), at ``SCHED_IDLE``:
  Linux runs it only on a CPU no other task wants;
- ``observer's priority, duty``: the same loop at the observing process's default priority, in a session of its
  own, lowered by the observing process's own code for the default ``observer`` settings (nice 10, its scheduling
  group niced too; proxy/runtime/observer_process.py);
- ``idle, always``: a loop that never sleeps, at ``SCHED_IDLE``;
- ``shadow stand-in, nice 19``: the demo ``candidate`` model server, the shadow stand-in of bench_observer, at
  ``nice -n 19`` in a session of its own whose scheduling group is niced 19 too (loadtest/processes.py ``lowered``),
  answering the fixed load's rate of calls from an h2load of its own, lowered the same way: what the stand-in for a
  remote shadow costs production on this machine by itself, with no mlmirror observer at all;
- ``shadow stand-in, nice 19 in the benchmark's session``: the same, both niced in this benchmark's session, as
  the benchmarks ran them before 2026-12-06: where Linux groups processes by session, that ranks them below h2load
  and the production model but not below mlmirror's worker, which has a session of its own.

First the saturation of "none" (closed loop, 4 connections x 8 streams); half of it is the fixed load. Then rounds
(variants interleaved, order rotated): warm-up, ``--calls`` at the fixed load (production p99), ``--saturation-calls``
closed loop (throughput), the burner running throughout; and the serving worker's CPU per call over the fixed-load
calls (``/proc/<pid>/stat``): the worker runs the same code in every variant, so a change there is the burner making
the worker's CPU slower (shared caches, the hypervisor), not more work. Ratios against "none", medians of per-round
ratios (range).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mlmirror.config import Config, parse_config
from mlmirror.runtime.observer_process import _lower_priority

from .bench_observer import _fmt, _ratio
from .bench_workers import _group_pids
from .h2load import ProcessCPU, run_h2load
from .ports import free_port, wait_for_port
from .processes import lowered, python_process, stop_process
from .systems import MODEL_INFER, print_report, request_file

__all__ = ["main"]

BURNER = """
import sys, time
burst, gap = float(sys.argv[1]), float(sys.argv[2])
while True:
    end = time.perf_counter() + burst
    while time.perf_counter() < end:
        pass
    if gap:
        time.sleep(gap)
"""


def _idle() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _observer_priority(config: Config) -> Callable[[], None]:
    """In a session of its own, lowered as the observing process lowers itself for ``config``."""

    def lower() -> None:
        os.setsid()
        _lower_priority(config)

    return lower


def _burner(burst_s: float, share: float, policy: Callable[[], None]) -> subprocess.Popen:
    gap = burst_s * (1 - share) / share if share < 1 else 0.0
    return subprocess.Popen([sys.executable, "-c", BURNER, f"{burst_s}", f"{gap}"], preexec_fn=policy)


def _stand_in_load(port: int, body: Path, rate: float, own_group: bool) -> subprocess.Popen:
    """h2load at nice 19 (``lowered(19, own_group)``) sending ``rate`` calls/s (over 4 connections) to the stand-in
    on ``port``, until stopped."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load not found: install Debian's nghttp2-client")
    command = [h2load, "-n", str(int(rate * 3600)), "-c", "4", f"--rps={rate / 4:.3f}", "-d", str(body),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"http://127.0.0.1:{port}{MODEL_INFER}"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lowered(19, own_group))  # fmt: skip


def run(args: argparse.Namespace, command: str) -> str:
    model, listen, admin, candidate, shared = free_port(), free_port(), free_port(), free_port(), free_port()
    config_text = (
        f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nupstreams: {{production: "
        f"127.0.0.1:{model}}}\nroutes:\n  - {{name: iris, match: {{model: iris}}, primary: production}}\n"
    )
    config = parse_config(config_text)
    burst, lower = args.burst * 1e-6, _observer_priority(config)
    #: variant -> what it starts beside the proxy, given the request body and the fixed load's rate (calls/s)
    variants: dict[str, Callable[[Path, float], subprocess.Popen | None]] = {
        "none": lambda body, rate: None,
        "idle, duty": lambda body, rate: _burner(burst, args.share, _idle),
        "observer's priority, duty": lambda body, rate: _burner(burst, args.share, lower),
        "idle, always": lambda body, rate: _burner(burst, 1.0, _idle),
        "shadow stand-in, nice 19": lambda body, rate: _stand_in_load(candidate, body, rate, True),
        "shadow stand-in, nice 19 in the benchmark's session": lambda body, rate: _stand_in_load(
            shared, body, rate, False
        ),
    }
    if args.variants:
        wanted = ["none", *(name.strip() for name in args.variants.split(";") if name.strip() != "none")]
        unknown = [name for name in wanted if name not in variants]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {list(variants)}")
        variants = {name: variants[name] for name in wanted}
    saturation: dict[str, list[float]] = {name: [] for name in variants}
    p99: dict[str, list[float]] = {name: [] for name in variants}
    worker_us: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, 8)
        config_file = folder / "proxy.yaml"
        config_file.write_text(config_text)
        with (
            python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{model}", "--model", "production"),
            python_process("-m", "mlmirror", "serve", "--config", str(config_file), "--workers", "1"),
            python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{candidate}", "--model",
                           "candidate", nice=19),
            python_process("-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{shared}", "--model",
                           "candidate", nice=19, own_group=False),
        ):  # fmt: skip
            wait_for_port(model)
            wait_for_port(candidate)
            wait_for_port(shared)
            wait_for_port(listen, 60)
            worker = ProcessCPU(_group_pids(admin)["worker 0"])
            run_h2load(listen, MODEL_INFER, body, calls=args.warmup, connections=4, streams=4)
            unwatched = run_h2load(listen, MODEL_INFER, body, calls=args.saturation_calls, connections=4,
                                   streams=8).rate  # fmt: skip
            rate = unwatched / 2
            names = list(variants)
            for round_ in range(args.rounds):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    burner = variants[name](body, rate)
                    try:
                        time.sleep(0.3)
                        run_h2load(listen, MODEL_INFER, body, calls=args.warmup, connections=4, streams=4)
                        before = worker.seconds()
                        fixed = run_h2load(listen, MODEL_INFER, body, calls=args.calls, connections=4, rate=rate)
                        worker_us[name].append((worker.seconds() - before) / max(fixed.calls, 1) * 1e6)
                        p99[name].append(float(np.percentile(fixed.latencies_us, 99)) / 1e3)
                        saturation[name].append(run_h2load(listen, MODEL_INFER, body, calls=args.saturation_calls,
                                                           connections=4, streams=8).rate)  # fmt: skip
                    finally:
                        if burner is not None:
                            stop_process(burner, timeout=2.0)
                    print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)

    def cell(values: list[float], base: list[float], spec: str) -> str:
        return f"{_fmt(values, spec)} | {_fmt(_ratio(values, base), '.2f', 'x')}"

    lines = [
        f"`{command}`",
        "",
        f"`mlmirror serve --workers 1`, nothing watched, demo production model, FP32 [8, 4] requests; burners of "
        f"{args.burst:g} µs bursts using {args.share:g} of a CPU (duty) or all of it (always); nothing watched "
        f"saturates at {unwatched:.0f} calls/s, fixed load {rate:.0f} calls/s ({args.calls} calls over 4 "
        f"connections); saturation: {args.saturation_calls} calls over 4 connections x 8 streams; {args.rounds} "
        "interleaved rounds. Medians (range); ratios against none, medians of per-round ratios.",
        "",
        "| burner beside the proxy | saturation (calls/s) | vs none | p99 at fixed load (ms) | vs none | worker CPU "
        "per call at fixed load (µs) | vs none |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in variants:
        lines.append(f"| {name} | {cell(saturation[name], saturation['none'], '.0f')} | "
                     f"{cell(p99[name], p99['none'], '.2f')} | "
                     f"{cell(worker_us[name], worker_us['none'], '.0f')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_contention", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6000, help="calls per fixed-load run (default 6000)")
    parser.add_argument("--saturation-calls", type=int, default=8000, help="calls per saturation run (default 8000)")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up calls before each run")
    parser.add_argument("--share", type=float, default=0.35, help="share of one CPU a duty burner uses (default 0.35)")
    parser.add_argument("--burst", type=float, default=300.0, help="a duty burner's burst, µs (default 300)")
    parser.add_argument("--variants", default="",
                        help="variants to run beside none, separated by semicolons (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.share <= 1:
        parser.error("--share must be in (0, 1]")
    return print_report("bench_contention", run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

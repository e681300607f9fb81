"""Benchmark: what shadows (and the drift engine) cost production calls, in latency and in the proxy's CPU.

    python -m loadtest.bench_shadows [--rate R | --load 0.5] [--calls 8000] [--rounds 5] [--warmup 1000]

One route (``iris`` -> the demo ``production`` model) behind four mlmirror processes that differ only in their
shadows, each mirroring 100% of calls with the default limits (timeout 2 s, max_inflight 32, queue_size 256):

- no shadow;
- 1 shadow: the ``candidate`` model;
- 2 shadows: ``candidate`` and a ``control`` shadow (a second instance of the production model);
- the drift engine on the route (windows of 1000 calls), no shadow;
- 1 hung shadow: a gRPC server that accepts every call, reads the request and never answers, so each copy ends at
  its 2 s timeout (DEADLINE_EXCEEDED). The shadow's circuit breaker is disabled (``circuit: {codes: []}``) so that
  the copies keep hanging for the whole run — in flight and queue full, every further copy dropped — the worst case;
  ``--hung-breaker`` keeps the default breaker instead, which opens after 5 timeouts and then drops copies at once.

Production, each shadow model and the hung server run in their own processes: only the mlmirror process's CPU is
measured. Without ``--rate`` the fixed load is ``--load`` (default half) of the no-shadow proxy's throughput at
saturation, measured first. Per round and configuration (rounds interleave them, in an order rotated each round):
warm-up calls at that rate, then ``--calls`` calls at that rate (h2load, 4 connections), from which come production's
p50/p99 latency and the mlmirror process's CPU time per call (user + system, all threads, from /proc). The table gives
medians over rounds; ratios against "no shadow" are medians of per-round ratios. Then the mirror counters each proxy
exports on its admin ``/metrics`` at the end, so that one sees the copies were made (or dropped). The run fails if a
proxy answered any call with a status other than OK.

Every process shares the machine's cores: on a small machine the shadow model servers' own CPU competes with the
proxy and production, which shows in production latency although no proxy work causes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from mlmirror.config import load_config
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request

from .bench_proxy import MODEL_INFER, _calls_by_code
from .h2load import ProcessCPU, grpc_frame, run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import MirrorCounts, drift_counts, metric_samples, mirror_counts

__all__ = ["main", "serve_hung"]

SHADOW_LIMITS = "timeout: 2s, max_inflight: 32, queue_size: 256"

NONE = "no shadow"
ONE = "1 shadow (candidate), 100%"
TWO = "2 shadows (candidate + control), 100%"
HUNG = "1 hung shadow, 100%"
DRIFT = "drift engine, no shadow"

#: configuration -> its shadows: (shadow upstream, control?)
SHADOWS: dict[str, tuple[tuple[str, bool], ...]] = {
    NONE: (),
    ONE: (("candidate", False),),
    TWO: (("candidate", False), ("control", True)),
    HUNG: (("hung", False),),
    DRIFT: (),
}
#: configurations whose route also runs the drift engine (windows of 1000 calls, reference from the first 1000)
DRIFT_ON = {DRIFT}
#: upstream -> the demo model it serves (each in its own process); the control shadow is production again
MODEL_SERVERS = {"production": "production", "candidate": "candidate", "control": "production"}
#: configuration -> (what, largest ratio to "no shadow" allowed): the issue's targets
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    ONE: (("p99", 1.10), ("CPU", 1.25)),
    TWO: (("p99", 1.10),),
    HUNG: (("p99", 1.05),),
}


def serve_hung(listen: str) -> None:
    """A gRPC server that accepts every call and never answers it: the caller's deadline ends each call."""

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await asyncio.get_running_loop().create_future()  # never done: the caller's deadline cancels the call

    class Hang(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            return grpc.unary_unary_rpc_method_handler(hang)

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Hang(),))
        server.add_insecure_port(listen)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


@dataclass
class Setup:
    """One mlmirror process and what was measured through it, one entry per round."""

    name: str
    port: int
    admin: int
    pid: int = 0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)


def _config(path: Path, setup: Setup, backends: dict[str, int], hung_breaker: bool) -> None:
    shadows = SHADOWS[setup.name]
    upstreams = [f"  production: {{address: 127.0.0.1:{backends['production']}, timeout: 2s}}"]
    for upstream, _ in shadows:
        circuit = "" if upstream != "hung" or hung_breaker else ", circuit: {codes: []}"
        upstreams.append(f"  {upstream}: {{address: 127.0.0.1:{backends[upstream]}{circuit}}}")
    route = ["  - name: iris", "    match: {model: iris}", "    primary: production"]
    if shadows:
        route.append("    shadows:")
        for upstream, control in shadows:
            extra = ", control: true" if control else ""
            route.append(f"      - {{upstream: {upstream}, percent: 100, {SHADOW_LIMITS}{extra}}}")
    if setup.name in DRIFT_ON:
        route.append("    drift: {window: 1000, capture: 1000, bins: 10}")
    lines = [f"listen: 127.0.0.1:{setup.port}", f"admin: 127.0.0.1:{setup.admin}", "upstreams:", *upstreams]
    path.write_text("\n".join([*lines, "routes:", *route, ""]))
    load_config(path)  # a mistake here would otherwise only show as a proxy that never listens


def _measure(setup: Setup, body: Path, args: argparse.Namespace, rate: float) -> None:
    if args.warmup:
        run_h2load(setup.port, MODEL_INFER, body, calls=args.warmup, connections=4, rate=rate)
    cpu = ProcessCPU(setup.pid, tree=True)
    before = cpu.seconds()
    fixed = run_h2load(setup.port, MODEL_INFER, body, calls=args.calls, connections=4, rate=rate)
    setup.cpu_us.append((cpu.seconds() - before) / fixed.calls * 1e6)
    if fixed.failed:
        raise RuntimeError(f"{setup.name}: {fixed.failed} calls failed at the fixed rate")
    setup.p50_ms.append(fixed.percentile_ms(50))
    setup.p99_ms.append(fixed.percentile_ms(99))
    setup.achieved.append(fixed.rate)


def _saturation(setup: Setup, body: Path, args: argparse.Namespace) -> float:
    """Closed-loop throughput of ``setup`` (4 connections x 8 streams), as bench_proxy measures it."""
    run_h2load(setup.port, MODEL_INFER, body, calls=max(args.warmup, 1), connections=4, streams=4)
    return run_h2load(setup.port, MODEL_INFER, body, calls=args.saturation_calls, connections=4, streams=8).rate


def run(args: argparse.Namespace, command: str) -> str:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "infer.bin"
        body.write_bytes(grpc_frame(infer_request(sample_features(rng, args.batch), request_id="bench-0001")))
        body_size = body.stat().st_size
        backends = {name: free_port() for name in ("production", "candidate", "control", "hung")}
        names = [NONE, *(n for n in SHADOWS if n != NONE and (not args.only or n in args.only))]
        setups = [Setup(name, free_port(), free_port()) for name in names]
        configs = {}
        for setup in setups:
            configs[setup.name] = Path(tmp) / f"mlmirror-{len(configs)}.yaml"
            _config(configs[setup.name], setup, backends, args.hung_breaker)
        model = ("-m", "mlmirror", "model-server", "--listen")
        with contextlib.ExitStack() as stack:
            for name, demo_model in MODEL_SERVERS.items():
                stack.enter_context(python_process(*model, f"127.0.0.1:{backends[name]}", "--model", demo_model))
            hung = f"from loadtest.bench_shadows import serve_hung; serve_hung('127.0.0.1:{backends['hung']}')"
            stack.enter_context(python_process("-c", hung))
            for setup in setups:
                setup.pid = stack.enter_context(
                    python_process("-m", "mlmirror", "serve", "--config", str(configs[setup.name]))
                ).pid
            for port in [*backends.values(), *(p for s in setups for p in (s.port, s.admin))]:
                wait_for_port(port)
            saturation = None
            rate = args.rate
            if rate is None:
                saturation = _saturation(setups[0], body, args)
                rate = args.load * saturation
                print(f"no-shadow saturation {saturation:.0f} calls/s: fixed load {rate:.0f}", file=sys.stderr)
            for round_ in range(args.rounds):
                shift = round_ % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    _measure(setup, body, args, rate)
                    print(f"round {round_ + 1}/{args.rounds}: {setup.name} done", file=sys.stderr, flush=True)
            calls = {setup.name: _calls_by_code(setup.admin) for setup in setups}
            mirrors = {setup.name: mirror_counts(metric_samples(setup.admin)) for setup in setups}
            drift = {s.name: drift_counts(metric_samples(s.admin)) for s in setups if s.name in DRIFT_ON}
    for name, codes in calls.items():
        if set(codes) != {"OK"}:
            raise RuntimeError(f"{name}: mlmirror answered calls with other statuses: {codes}")
    header = _header(args, command, body_size, rate, saturation)
    return "\n".join(
        [
            *header,
            "",
            *_table(setups, rate),
            "",
            *_mirror_table(calls, mirrors),
            "",
            *_drift_table(calls, drift, setups),
        ]
    )


def _drift_table(
    calls: dict[str, dict[str, float]], drift: dict[str, dict[str, float]], setups: list[Setup]
) -> list[str]:
    lines = [
        "Drift engine counters at the end (warm-up calls included), and the rate it sustained while the proxy served "
        "the fixed load:",
        "",
        "| configuration | client calls | counted by the engine | dropped (queue full) | decode errors "
        "| windows closed | rows/s sustained |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        if setup.name not in drift:
            continue
        totals = drift[setup.name]
        counted = totals.get("mlmirror_drift_calls_total", 0.0)
        lines.append(
            f"| {setup.name} | {sum(calls[setup.name].values()):.0f} | {counted:.0f} "
            f"| {totals.get('mlmirror_drift_dropped_total', 0.0):.0f} "
            f"| {totals.get('mlmirror_drift_decode_errors_total', 0.0):.0f} "
            f"| {totals.get('mlmirror_drift_windows_total', 0.0):.0f} | {statistics.median(setup.achieved):.0f} |"
        )
    return lines


def _header(args: argparse.Namespace, command: str, body_size: int, rate: float, saturation: float | None) -> list[str]:
    load = (
        "given by --rate"
        if saturation is None
        else f"{args.load:g} x the no-shadow proxy's {saturation:.0f} at saturation"
    )
    hung = (
        "default circuit breaker (opens after 5 timeouts; open, it drops copies at once)"
        if args.hung_breaker
        else "circuit breaker disabled, so copies hang until their timeout for the whole run (worst case)"
    )
    return [
        f"Command: `{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features ({body_size} bytes framed), route iris -> production "
        f"(its own process). Fixed load {rate:.0f} calls/s ({load}) over 4 connections; per round and configuration "
        f"{args.warmup} warm-up calls then {args.calls} measured calls at that load; {args.rounds} interleaved "
        f"round(s), order rotated each round. Shadows mirror 100% ({SHADOW_LIMITS}), each to its own model-server "
        f"process. Hung shadow: a gRPC server that accepts every call and never answers (not a bare TCP listener); "
        f"{hung}. {os.cpu_count()} CPU cores shared by every process. Latency and CPU: medians over rounds (range); "
        "ratios: medians of per-round ratios to no shadow.",
    ]


def _fmt(values: list[float], spec: str, unit: str = "") -> str:
    """The median, and the range in brackets when there are several values."""
    median = f"{statistics.median(values):{spec}}{unit}"
    if len(values) < 2:
        return median
    return f"{median} ({min(values):{spec}}{unit}-{max(values):{spec}}{unit})"


def _table(setups: list[Setup], rate: float) -> list[str]:
    med = statistics.median
    none = setups[0]
    lines = [
        "| configuration | offered / achieved (calls/s) | p50 (ms) | p99 (ms) | p99 vs none "
        "| proxy CPU per call (µs) | CPU vs none | target | met? |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in setups:
        ratios = {
            "p99": [a / b for a, b in zip(s.p99_ms, none.p99_ms, strict=True)],
            "CPU": [a / b for a, b in zip(s.cpu_us, none.cpu_us, strict=True)],
        }
        targets = TARGETS.get(s.name, ())
        target = "; ".join(f"{what} ≤ {limit:.2f}x" for what, limit in targets) or "—"
        met = "; ".join(f"{what} {'met' if med(ratios[what]) <= limit else 'missed'}" for what, limit in targets)
        p99_ratio, cpu_ratio = (_fmt(ratios[what], ".3f", "x") if s is not none else "1.000x" for what in ratios)
        lines.append(
            f"| {s.name} | {rate:.0f} / {med(s.achieved):.0f} | {_fmt(s.p50_ms, '.2f')} | {_fmt(s.p99_ms, '.2f')} "
            f"| {p99_ratio} | {_fmt(s.cpu_us, '.0f')} | {cpu_ratio} | {target} | {met or '—'} |"
        )
    behind = [s.name for s in setups if med(s.achieved) < 0.95 * rate]
    if behind:
        lines += [
            "",
            f"Offered load not reached by: {', '.join(behind)}. h2load sends one call at a time per connection, so "
            "a system that cannot keep up is driven closed-loop: its latency is that of a saturated system and "
            "understates the queueing an open-loop client would see.",
        ]
    return lines


def _mirror_table(calls: dict[str, dict[str, float]], mirrors: dict[str, dict[str, MirrorCounts]]) -> list[str]:
    def by_key(counts: dict[str, float]) -> str:
        return ", ".join(f"{key} {n:.0f}" for key, n in sorted(counts.items()) if n) or "—"

    lines = [
        "Mirror counters from each proxy's admin /metrics at the end (warm-up calls included; a copy is counted when "
        "it finishes, so each client call is one copy per shadow: finished + dropped + still pending):",
        "",
        "| configuration | shadow | client calls | copies finished (mlmirror_mirror_requests_total) | by result "
        "| copies dropped (mlmirror_mirror_dropped_total) | by reason | pending at the end |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for name, shadows in SHADOWS.items():
        if name not in mirrors:
            continue
        for upstream, _ in shadows:
            counts = mirrors[name].get(upstream, MirrorCounts())
            lines.append(
                f"| {name} | {upstream} | {sum(calls[name].values()):.0f} | {sum(counts.results.values()):.0f} "
                f"| {by_key(counts.results)} | {sum(counts.drops.values()):.0f} | {by_key(counts.drops)} "
                f"| {counts.pending:.0f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, help="fixed offered load, calls/s (default: --load x saturation)")
    parser.add_argument("--load", type=float, default=0.5, help="fixed load as a fraction of the no-shadow proxy's "
                        "throughput at saturation, measured first when --rate is not given (default 0.5)")  # fmt: skip
    parser.add_argument("--calls", type=int, default=8000, help="measured calls per configuration and round")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up calls at the fixed load before each run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--saturation-calls", type=int, default=10000, help="calls of the saturation run")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--hung-breaker", action="store_true", help="keep the hung shadow's default circuit breaker")
    parser.add_argument("--only", action="append", choices=list(SHADOWS)[1:], metavar="CONFIGURATION",
                        help="measure only this configuration (and no shadow); may be repeated")  # fmt: skip
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "loadtest.bench_shadows", *given])
    print(run(args, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

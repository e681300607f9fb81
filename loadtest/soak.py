"""Soak test: many calls through mlmirror with a shadow and the drift engine on, and a verdict on leaks.

    python -m loadtest.soak --calls 1000000 [--rate 800] [--every 50000] [--warmup 50000] [--batch 4]

Processes (each its own): the demo ``production`` model, the demo ``candidate`` model as a shadow at 100%, and
``mlmirror serve`` with a route ``iris`` that mirrors every call to the candidate and runs the drift engine (windows
of 1000 calls, reference captured from the first 1000, ground truth on the ``probabilities`` output, keeping at
most ``--max-pending`` predictions).

Load: h2load (Debian's nghttp2-client) at a fixed rate below saturation, in runs of at most 5000 calls, each run
sending one of ``--bodies`` ModelInferRequests of ``--batch`` rows of iris-like features (raw FP32 contents, no
request id: the proxy assigns one per call, so every call is a new entry for the ground-truth store). After every
``--every`` calls the script samples the proxy process: RSS, file descriptors (and sockets), threads from
/proc/PID; calls, asyncio tasks, mirror and drift queues, predictions pending and drops from its /metrics; and
sends ``--outcomes`` calls of its own with known request ids whose outcomes it reports over the Feedback service.
While each run goes on it polls /metrics every ``--poll`` seconds for the highest queue depths and task count.

After the load it waits for the queues to drain, takes a last sample and checks: RSS after warm-up grew by less
than ``--max-rss-growth`` MB; tasks, fds and threads back to where they were; queues empty; every mirror copy
finished or dropped; every call counted by the drift engine; every outcome joined. Prints a markdown table and
the checks; exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from mlmirror.config import load_config
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.protocol.kserve import response_outputs
from mlmirror.protocol.names import FEEDBACK_SERVICE
from mlmirror.protos import feedback_pb2

from .bench_proxy import MODEL_INFER
from .h2load import LoadResult, grpc_frame, run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import metric_samples
from .soak_report import Sample, Soak, render, sample_from, verdict

__all__ = ["main"]

RUN_CALLS = 5000  # calls per h2load run at most (each run sends one request body)
SHADOW = "timeout: 2s, max_inflight: 32, queue_size: 256"


def _config(path: Path, port: int, admin: int, production: int, candidate: int, max_pending: int) -> None:
    path.write_text(
        f"""listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
upstreams:
  production: {{address: 127.0.0.1:{production}, timeout: 2s}}
  candidate: {{address: 127.0.0.1:{candidate}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows:
      - {{upstream: candidate, percent: 100, {SHADOW}}}
    drift:
      window: 1000
      capture: 1000
      ground_truth: {{output: probabilities, max_pending: {max_pending}, window: 400}}
"""
    )
    load_config(path)  # a mistake here would otherwise only show as a proxy that never listens


class Poller:
    """Polls the proxy's /metrics while a load run goes on; keeps the highest queue depths and task count."""

    def __init__(self, pid: int, admin: int) -> None:
        self.pid, self.admin = pid, admin
        self.peak_mirror = self.peak_drift = self.peak_tasks = 0

    def poll(self) -> Sample:
        sample = sample_from("", self.pid, metric_samples(self.admin))
        self.peak_mirror = max(self.peak_mirror, sample.mirror_pending)
        self.peak_drift = max(self.peak_drift, sample.drift_queued)
        self.peak_tasks = max(self.peak_tasks, sample.tasks)
        return sample

    def take(self, label: str) -> Sample:
        """A sample now, carrying the peaks polled since the previous one (which start again from it)."""
        sample = self.poll()
        sample.label = label
        sample.peak_mirror, sample.peak_drift, sample.peak_tasks = self.peak_mirror, self.peak_drift, self.peak_tasks
        self.peak_mirror, self.peak_drift, self.peak_tasks = sample.mirror_pending, sample.drift_queued, sample.tasks
        return sample


def _load(port: int, body: Path, calls: int, args: argparse.Namespace, poll: Callable[[], object]) -> LoadResult:
    """One h2load run of ``calls`` calls at ``--rate``, calling ``poll`` every ``--poll`` seconds meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            run_h2load, port, MODEL_INFER, body, calls=calls, connections=args.connections, rate=args.rate
        )
        while True:
            try:
                return run.result(timeout=args.poll)
            except TimeoutError:
                poll()


def _outcomes(
    channel: grpc.Channel, round_: int, args: argparse.Namespace, settle: Callable[[], object]
) -> dict[str, int]:
    """``--outcomes`` calls with known request ids, then (once ``settle`` says the drift engine has stored their
    predictions) their outcomes over mlmirror.v1.Feedback: production's label, every 10th row another class.
    Returns the outcomes' counts by result."""
    rng = np.random.default_rng(round_)
    infer = channel.unary_unary(MODEL_INFER)
    outcomes = []
    for i in range(args.outcomes):
        request_id = f"soak-{round_}-{i}"
        _, outputs = response_outputs(infer(infer_request(sample_features(rng, args.batch), request_id=request_id)))
        labels = next(t for t in outputs if t.name == "label").values.astype(int).tolist()
        truth = [str((label + (row % 10 == 0)) % 3) for row, label in enumerate(labels)]
        outcomes.append(feedback_pb2.Outcome(request_id=request_id, labels=truth))
    settle()
    report = channel.unary_unary(f"/{FEEDBACK_SERVICE}/ReportOutcome",
                                 response_deserializer=feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
    answer = report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes).SerializeToString(), timeout=10)
    fields = ("matched", "unknown", "late", "duplicate", "invalid", "early")  # early: parked, joined when it lands
    return {field: getattr(answer, field) for field in fields}


def _settle(poller: Poller, within: float = 30.0) -> None:
    """Wait until no call, shadow copy or drift record is pending (at most ``within`` seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        s = poller.poll()
        if s.mirror_pending == s.drift_queued == s.inflight == 0:
            return
        time.sleep(0.1)


def _drive(args: argparse.Namespace, port: int, admin: int, pid: int, bodies: list[Path]) -> Soak:
    poller = Poller(pid, admin)
    outcomes: dict[str, int] = {}
    before = poller.take("before load")
    during: list[Sample] = []
    failed = sent = runs = 0
    latencies: list[np.ndarray] = []
    started = time.monotonic()
    mark, mark_calls = started, 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while sent < args.calls:
            calls = min(RUN_CALLS, args.calls - sent, args.every - sent % args.every)
            result = _load(port, bodies[runs % len(bodies)], calls, args, poller.poll)
            runs += 1
            sent += calls
            failed += result.failed
            latencies.append(result.latencies_us)
            if sent % args.every and sent < args.calls:
                continue
            now = time.monotonic()
            sample = poller.take("")
            sample.label = f"{sample.calls:,}"
            sample.rate = (sent - mark_calls) / (now - mark)
            sample.p99_ms = float(np.percentile(np.concatenate(latencies), 99)) / 1000.0
            during.append(sample)
            print(f"soak: {sent:,}/{args.calls:,} calls, RSS {sample.rss_mb:.1f} MB, tasks {sample.tasks}, "
                  f"fds {sample.fds}, {sample.rate:.0f} calls/s", file=sys.stderr, flush=True)  # fmt: skip
            settle = functools.partial(_settle, poller, within=5.0)
            for result_name, n in _outcomes(channel, len(during), args, settle).items():
                outcomes[result_name] = outcomes.get(result_name, 0) + n
            mark, mark_calls, latencies = time.monotonic(), sent, []
    load_seconds = time.monotonic() - started
    _settle(poller)
    time.sleep(1.0)  # connections the load generator closed are released
    after = poller.take("after the drain")
    after.label = f"after the drain ({after.calls:,})"
    return Soak(before, during, after, args.warmup, 1, load_seconds, failed, outcomes)


def run(args: argparse.Namespace, command: str) -> tuple[str, bool]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = []
        for i in range(args.bodies):
            bodies.append(Path(tmp) / f"infer-{i}.bin")
            bodies[-1].write_bytes(grpc_frame(infer_request(sample_features(rng, args.batch))))
        ports = {name: free_port() for name in ("production", "candidate", "proxy", "admin")}
        config = Path(tmp) / "mlmirror.yaml"
        _config(config, ports["proxy"], ports["admin"], ports["production"], ports["candidate"], args.max_pending)
        log = args.proxy_log or Path(tmp) / "proxy.log"
        model = ("-m", "mlmirror", "model-server", "--listen")
        with contextlib.ExitStack() as stack:
            for name in ("production", "candidate"):
                stack.enter_context(python_process(*model, f"127.0.0.1:{ports[name]}", "--model", name))
            proxy = stack.enter_context(python_process("-m", "mlmirror", "serve", "--config", str(config), log=log))
            for port in ports.values():
                wait_for_port(port)
            time.sleep(1.0)  # the first health checks connect the upstream channels
            soak = _drive(args, ports["proxy"], ports["admin"], proxy.pid, bodies)
            body_size = bodies[0].stat().st_size
    checks = verdict(soak, args.max_rss_growth, args.slack)
    lines = [
        f"Command: `{command}`",
        "",
        f"ModelInfer, {args.batch} rows of 4 FP32 features per call ({body_size} bytes framed, {args.bodies} "
        f"different bodies), route iris -> production, 1 shadow (candidate) at 100% ({SHADOW}), drift engine "
        f"(windows of 1000 calls, reference from the first 1000, ground truth with max_pending {args.max_pending:,}). "
        f"h2load at {args.rate:g} calls/s offered over {args.connections} connections; every {args.every:,} calls "
        f"a sample and {args.outcomes} calls whose outcomes are reported. Warm-up: the first {args.warmup:,} calls.",
        "",
        f"Load: {args.calls:,} calls in {soak.load_seconds:.0f} s ({args.calls / soak.load_seconds:.0f} calls/s "
        "achieved, sampling pauses included).",
        "",
        *render(soak, checks),
    ]
    return "\n".join(lines), all(c.passed for c in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000, help="calls to send (default 1,000,000)")
    parser.add_argument("--rate", type=float, default=800.0, help="offered load, calls/s (default 800)")
    parser.add_argument("--every", type=int, default=50_000, help="calls between samples (default 50,000)")
    parser.add_argument("--warmup", type=int, help="calls before the memory baseline (default: --every)")
    parser.add_argument("--batch", type=int, default=4, help="rows per request (default 4)")
    parser.add_argument("--bodies", type=int, default=16, help="different request bodies, in turn (default 16)")
    parser.add_argument("--connections", type=int, default=8, help="h2load connections (default 8)")
    parser.add_argument("--outcomes", type=int, default=100, help="calls with reported outcomes per sample")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between polls of /metrics under load")
    parser.add_argument("--max-rss-growth", type=float, default=50.0, help="MB allowed after warm-up (default 50)")
    parser.add_argument("--slack", type=int, default=2, help="tasks, fds, threads allowed above the idle figures")
    parser.add_argument("--max-pending", type=int, default=20_000, help="predictions the ground-truth store keeps "
                        "(default 20,000: full within the warm-up; about 0.8 KB each)")  # fmt: skip
    parser.add_argument("--proxy-log", type=Path, help="keep the proxy's log in this file")
    args = parser.parse_args(argv)
    args.warmup = args.every if args.warmup is None else args.warmup
    if min(args.calls, args.every, args.rate) <= 0 or math.isnan(args.rate):
        parser.error("--calls, --every and --rate must be positive")
    given = sys.argv[1:] if argv is None else argv
    report, passed = run(args, shlex.join(["python", "-m", "loadtest.soak", *given]))
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

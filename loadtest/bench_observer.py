"""Benchmark: what watching costs production, for a lone proxy and for the hub shape (workers + an observing hub).

    python -m loadtest.bench_observer [--rounds 3] [--calls 8000] [--hub-workers 1] [--shapes lone,workers]
                                      [--configurations ...] [--profile DIR]

One route (``iris`` -> the demo ``production`` model server, KServe V2 tensors: ``--batch`` rows of 4 FP32
features in, FP32 probabilities and INT64 labels out) behind mlmirror in eight configurations
(``--configurations`` picks some; nothing watched always runs):

- nothing watched; 1 shadow at 100% (the ``candidate`` model, compared); drift only (windows of 1000 calls);
  1 shadow + drift; the same with the shadow's ``batch: 16`` (up to 16 copies merged into one request); the same
  with ``transport: grpc`` (copies over a grpc.aio channel instead of mlmirror's own HTTP/2 client); the same
  with its stand-in niced inside this benchmark's session (below);
  1 hung shadow (a server that never answers; breaker off, so copies hang to their 2 s timeout).

Each configuration runs in the shapes ``--shapes`` names: a lone proxy (``lone``: ``mlmirror serve
--single-process``), and ``serve --workers N`` (``workers``; ``--hub-workers``, default 1), where N serving workers
relay and hand watched calls over the door to the observing process, which makes the copies and runs the drift
engine; the other ``workers-*`` shapes are the same with one observer setting changed (``SHAPES``): shedding on
CPU pressure (``cpu_pressure_limit``), ``SCHED_IDLE`` instead of the niceness (``scheduling: idle``), a CPU budget
(``cpu_limit``), and an observer that never waits for serving to have time to spare (``workers-eager``:
``serving_idle: off``). The shadow model servers (candidate and hung) run at ``nice -n 19``, each in a session of its
own whose scheduling group is niced 19 too (loadtest/processes.py ``lowered``): where Linux groups processes by
session (``kernel.sched_autogroup_enabled``), a niceness ranks a process only within its session's group, and
mlmirror's workers each have a session of their own. "(stand-in in the benchmark's session)" is the candidate niced
19 in this benchmark's session, as every shadow stand-in ran before 2026-12-06: below h2load and the production
model, an equal of the serving worker. Production and h2load run at normal priority.

Per shape: first the saturation throughput of "nothing watched" (closed loop, 4 connections x 8 streams), whose half
is the fixed load for every configuration of that shape. Then rounds (configurations interleaved, order rotated):
warm-up, ``--calls`` at the fixed load over 4 connections (production p99; CPU per call of every mlmirror process;
the share of those calls the observers saw: drift engine calls counted, shadow copies answered OK), then
``--saturation-calls`` closed loop (throughput; and the share of those calls the observers saw, "observed at
saturation": what an observer that yields to serving still sees when the machine is full). Ratios are against
nothing watched of the same shape, medians of per-round ratios (range). "serving CPU" is the processes that relay
(the lone proxy; the workers), "tree CPU" every mlmirror process (the lone proxy; the supervisor, the workers and
the observing process).

``--profile DIR``: after the rounds, py-spy (pip install py-spy) records every mlmirror process of "1 shadow + drift"
in each shape for one more fixed-load run; the hottest functions (own time) of each are printed, the raw stacks
written to DIR.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_shadows import SHADOW_LIMITS
from .bench_workers import _group_pids
from .h2load import run_h2load
from .ports import free_port, wait_for_port
from .processes import python_process
from .scrape import drift_counts, metric_samples, mirror_counts
from .systems import MODEL_INFER, Load, System, add_load_arguments, failed_lines, print_report, request_file, rounds

__all__ = ["CONFIGURATIONS", "main"]

NONE = "nothing watched"
SHADOW = "1 shadow, 100%"
DRIFT = "drift only"
BOTH = "1 shadow + drift"
MERGED = "1 shadow (batch: 16) + drift"
GRPC = "1 shadow (transport: grpc) + drift"
SHARED = "1 shadow + drift (stand-in in the benchmark's session)"
HUNG = "hung shadow"
#: configuration -> (shadow upstream or None, drift on?, the shadow's other keys)
CONFIGURATIONS: dict[str, tuple[str | None, bool, str]] = {
    NONE: (None, False, ""), SHADOW: ("candidate", False, ""), DRIFT: (None, True, ""), BOTH: ("candidate", True, ""),
    MERGED: ("candidate", True, ", batch: 16"), GRPC: ("candidate", True, ", transport: grpc"),
    SHARED: ("shared", True, ""), HUNG: ("hung", False, ""),
}  # fmt: skip
#: the shadow upstreams that answer, whose copies count in the observed share
ANSWERING = ("candidate", "shared")
#: (configuration, measure) -> the largest ratio to nothing watched the issue allows
TARGETS = {
    (both, measure): limit
    for both in (BOTH, MERGED, GRPC, SHARED)
    for measure, limit in (("saturation", 0.90), ("p99", 1.10), ("serving", 1.05), ("tree", 1.8))
}
TARGETS[HUNG, "p99"] = 1.05
OBSERVED_TARGET = 0.99
#: the ``serve --workers N`` shapes: name -> the observer keys they set (YAML flow mapping entries)
SHAPES = {
    "workers": "",
    "workers-pressure": "cpu_pressure_limit: 0.8",
    "workers-idle": "scheduling: idle",
    "workers-limit": "cpu_limit: 0.15",
    "workers-eager": "serving_idle: off",
}


def _config(path: Path, name: str, listen: int, admin: int, backends: dict[str, int], observer: str) -> None:
    shadow, drift, keys = CONFIGURATIONS[name]
    upstreams = [f"  production: {{address: 127.0.0.1:{backends['production']}, timeout: 2s}}"]
    route = ["  - name: iris", "    match: {model: iris}", "    primary: production"]
    if shadow is not None:
        circuit = ", circuit: {codes: []}" if shadow == "hung" else ""
        upstreams.append(f"  {shadow}: {{address: 127.0.0.1:{backends[shadow]}{circuit}}}")
        route += [f"    shadows: [{{upstream: {shadow}, percent: 100, {SHADOW_LIMITS}{keys}}}]",
                  "    compare: {classification: argmax, output: probabilities}"]  # fmt: skip
    if drift:
        route.append("    drift: {window: 1000, capture: 1000, bins: 10}")
    lines = [f"listen: 127.0.0.1:{listen}", f"admin: 127.0.0.1:{admin}", "mirror_shed_lag: off",
             f"observer: {{{observer}}}", "upstreams:"]  # fmt: skip
    path.write_text("\n".join([*lines, *upstreams, "routes:", *route, ""]))


class Observed:
    """Reads each system's observer counters around its fixed-rate calls and its closed-loop (saturation) calls: the
    share of them each observer saw."""

    def __init__(self, admins: dict[str, int], calls: int, saturation_calls: int) -> None:
        self.admins = admins
        self.calls = {"fixed": calls, "saturation": saturation_calls}
        self._before: dict[tuple[str, str], tuple[float, float]] = {}
        #: system -> phase (fixed, saturation) -> observer (shadow, drift) -> shares, one per round
        self.shares: dict[str, dict[str, dict[str, list[float]]]] = collections.defaultdict(
            lambda: {phase: {"shadow": [], "drift": []} for phase in self.calls}
        )

    def _counts(self, name: str, settle: bool) -> tuple[float, float]:
        """(shadow copies answered OK, drift calls counted), once no copy is pending and the drift count holds
        still for 0.3 s (at most 15 s), so that earlier calls are not counted with the next run's."""
        deadline = time.monotonic() + 15.0
        last = None
        while True:
            samples = metric_samples(self.admins[name])
            mirrors = mirror_counts(samples)
            counts = (sum(m.results.get("OK", 0.0) for m in mirrors.values()),
                      drift_counts(samples)["mlmirror_drift_calls_total"])  # fmt: skip
            settled = all(m.pending == 0 for m in mirrors.values()) and counts == last
            if settled or not settle or time.monotonic() > deadline:
                return counts
            last = counts
            time.sleep(0.3)

    def __call__(self, system: System, when: str) -> None:
        shadow, drift_on, _ = CONFIGURATIONS[system.name.split(" | ")[1]]
        answers = shadow in ANSWERING
        settle = answers or drift_on  # a hung shadow's copies never settle: nothing to wait for
        edge, _, phase = when.partition(" ")
        phase = phase or "fixed"
        if edge == "before":
            self._before[system.name, phase] = self._counts(system.name, settle)
            return
        (copies_0, drift_0), (copies, drift) = self._before[system.name, phase], self._counts(system.name, settle)
        shares = self.shares[system.name][phase]
        if answers:
            shares["shadow"].append((copies - copies_0) / self.calls[phase])
        if drift_on:
            shares["drift"].append((drift - drift_0) / self.calls[phase])


def _profile(pids: dict[str, int], seconds: float, folder: Path, tag: str) -> dict[str, subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    return {label: subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(folder / f"{tag}-{label}.raw"), "-f",
                                     "raw", "-d", f"{seconds:.0f}", "-r", "100", "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for label, pid in pids.items()}  # fmt: skip


def hottest(raw: Path, top: int = 8) -> list[tuple[float, str]]:
    """(share of samples, function) of the functions with the most own time in a py-spy raw file."""
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        own[stack.rsplit(";", 1)[-1]] += int(count)
    samples = sum(own.values()) or 1
    return [(n / samples, frame) for frame, n in own.most_common(top)]


def _ratio(values: list[float], base: list[float]) -> list[float]:
    return [v / b for v, b in zip(values, base, strict=True) if b]


def _fmt(values: list[float], spec: str, unit: str = "") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{spec}}{unit} ({min(values):{spec}}-{max(values):{spec}})"


def _shape_rows(
    shape: str, systems: list[System], observed: Observed, serving: list[str], tree: list[str]
) -> list[str]:
    def p99(system: System) -> list[float]:
        return [float(np.percentile(s, 99)) * 1e3 for s in system.latencies_s]

    def cpu(system: System, labels: list[str]) -> list[float]:
        chosen = [k for k in system.cpu_us if k in labels]
        return [sum(values) for values in zip(*(system.cpu_us[k] for k in chosen), strict=True)]

    base = systems[0]
    rows = []
    for system in systems:
        name = system.name.split(" | ")[1]
        cells = {
            "saturation": (system.saturated, base.saturated, ".0f"),
            "p99": (p99(system), p99(base), ".2f"),
            "serving": (cpu(system, serving), cpu(base, serving), ".0f"),
            "tree": (cpu(system, tree), cpu(base, tree), ".0f"),
        }
        parts = [shape, name]
        met = []
        for measure, (values, reference, spec) in cells.items():
            ratios = _ratio(values, reference)
            parts += [_fmt(values, spec), _fmt(ratios, ".2f", "x")]
            target = TARGETS.get((name, measure))
            if target is not None and ratios:
                ok = statistics.median(ratios) >= target if measure == "saturation" else statistics.median(
                    ratios) <= target  # fmt: skip
                met.append(f"{measure} {'met' if ok else 'missed'}")
        phases = observed.shares[system.name]
        seen = {phase: " / ".join(f"{kind} {_fmt([100 * v for v in values], '.1f', '%')}"
                                  for kind, values in shares.items() if values) or "-"
                for phase, shares in phases.items()}  # fmt: skip
        if any(phases["fixed"].values()):
            low = min(min(v) for v in phases["fixed"].values() if v)
            met.append(f"observed {'met' if low >= OBSERVED_TARGET else 'missed'}")
        rows.append("| " + " | ".join([*parts, seen["fixed"], seen["saturation"], "; ".join(met) or "-"]) + " |")
    return rows


def run(args: argparse.Namespace, command: str) -> str:
    workers = ["--workers", str(args.hub_workers)]
    every = {"lone": ("lone proxy", ["--single-process"], "")}
    for shape, keys in SHAPES.items():
        every[shape] = (f"--workers {args.hub_workers}" + (f", observer: {{{keys}}}" if keys else ""), workers, keys)
    shapes = {every[key][0]: every[key][1:] for key in args.shapes}
    rows: list[str] = []
    notes: list[str] = []
    all_systems: list[System] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = request_file(folder, args.batch)
        backends = {"production": free_port(), "candidate": free_port(), "shared": free_port(), "hung": free_port()}
        model = ("-m", "mlmirror", "model-server", "--listen")
        with contextlib.ExitStack() as models:
            models.enter_context(python_process(*model, f"127.0.0.1:{backends['production']}", "--model",
                                                "production"))  # fmt: skip
            models.enter_context(python_process(*model, f"127.0.0.1:{backends['candidate']}", "--model",
                                                "candidate", nice=19))  # fmt: skip
            models.enter_context(python_process(*model, f"127.0.0.1:{backends['shared']}", "--model", "candidate",
                                                nice=19, own_group=False))  # fmt: skip
            models.enter_context(python_process("-c", "import sys; from loadtest.bench_shadows import serve_hung; "
                                                "serve_hung(sys.argv[1])", f"127.0.0.1:{backends['hung']}",
                                                nice=19))  # fmt: skip
            for port in backends.values():
                wait_for_port(port)
            for shape, (flags, observer_keys) in shapes.items():
                grouped = flags[0] == "--workers"
                systems: list[System] = []
                admins: dict[str, int] = {}
                with contextlib.ExitStack() as stack:
                    for name in [NONE, *(c for c in CONFIGURATIONS if c != NONE and c in args.configurations)]:
                        listen, admin = free_port(), free_port()
                        path = folder / f"{len(all_systems) + len(systems)}.yaml"
                        _config(path, name, listen, admin, backends, observer_keys)
                        process = stack.enter_context(python_process("-m", "mlmirror", "serve", "--config",
                                                                     str(path), *flags))  # fmt: skip
                        wait_for_port(listen, 60)
                        # measure() counts each pid with its descendants: the supervisor's "tree" is the whole group
                        pids = {"tree": process.pid, **_group_pids(admin)} if grouped else {"proxy": process.pid}
                        system = System(f"{shape} | {name}", listen, pids)
                        admins[system.name] = admin
                        systems.append(system)
                    serving = [k for k in systems[0].pids if k == "proxy" or k.startswith("worker")]
                    run_h2load(systems[0].port, MODEL_INFER, body, calls=args.warmup, connections=4, streams=4)
                    unwatched = run_h2load(systems[0].port, MODEL_INFER, body, calls=args.saturation_calls,
                                           connections=4, streams=8).rate  # fmt: skip
                    rate = args.load * unwatched
                    notes.append(f"{shape}: nothing watched saturates at {unwatched:.0f} calls/s; fixed load "
                                 f"{rate:.0f} calls/s")  # fmt: skip
                    observed = Observed(admins, args.calls, args.saturation_calls)
                    rounds(systems, body, Load(args.warmup, args.calls, rate, args.saturation_calls), args.rounds,
                           observed)  # fmt: skip
                    rows += _shape_rows(shape, systems, observed, serving, ["tree" if grouped else "proxy"])
                    if args.profile is not None:
                        both = next(s for s in systems if s.name.endswith(BOTH))
                        seconds = args.calls / rate
                        spied = {k: v for k, v in both.pids.items() if k != "tree"}  # the supervisor only serves admin
                        spies = _profile(spied, seconds, args.profile, shape.replace(" ", "_"))
                        time.sleep(1.0)
                        run_h2load(both.port, MODEL_INFER, body, calls=args.calls, connections=4, rate=rate)
                        for label, spy in spies.items():
                            spy.wait(timeout=seconds + 60)
                            raw = args.profile / f"{shape.replace(' ', '_')}-{label}.raw"
                            if raw.exists():
                                top = ", ".join(f"{share:.0%} {frame}" for share, frame in hottest(raw))
                                notes.append(f"profile, {shape}, {BOTH}, {label}: {top}")
                all_systems += systems
    lines = [
        f"`{command}`",
        "",
        f"ModelInfer, {args.batch} row(s) of 4 FP32 features in, FP32 [n,3] + INT64 [n] out (the demo models); "
        f"per shape, the fixed load is {args.load:g} of nothing watched's saturation, {args.calls} calls over 4 "
        f"connections per round; saturation: {args.saturation_calls} calls over 4 connections x 8 streams; "
        f"{args.rounds} interleaved rounds; shadow model servers at nice 19, in scheduling groups of their own niced "
        f"19; shadows {SHADOW_LIMITS}. Medians over rounds (range); ratios against nothing watched of the same "
        "shape, medians of per-round ratios.",
        "",
        *[f"- {note}" for note in notes],
        "",
        "| shape | configuration | saturation (calls/s) | vs none | p99 at fixed load (ms) | vs none | serving CPU "
        "per call (µs) | vs none | tree CPU per call (µs) | vs none | observed share | observed at saturation | "
        "targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        *rows,
        *failed_lines(all_systems),
    ]
    return "\n".join(lines)


def configurations(text: str) -> list[str]:
    """The configurations a comma-separated ``text`` names (a name may hold a comma: "1 shadow, 100%")."""
    names: list[str] = []
    pending = ""
    for piece in text.split(","):
        pending = f"{pending},{piece}" if pending else piece
        if pending.strip() in CONFIGURATIONS:
            names.append(pending.strip())
            pending = ""
    if pending:
        raise argparse.ArgumentTypeError(f"{pending.strip()!r} is none of: {'; '.join(CONFIGURATIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_observer", description=__doc__.split("\n")[0])
    add_load_arguments(parser, saturation_calls=10000)
    parser.set_defaults(batch=8)  # FP32 [8, 4] requests
    parser.add_argument("--load", type=float, default=0.5, help="fixed load, share of unwatched saturation")
    parser.add_argument("--hub-workers", type=int, default=1, help="serving workers of the hub shape (default 1)")
    parser.add_argument("--profile", type=Path, help="py-spy the processes of '1 shadow + drift'; raw stacks here")
    parser.add_argument("--shapes", type=lambda text: text.split(","), default=["lone", "workers"],
                        help="comma-separated: lone, " + ", ".join(f"{shape} ({keys or 'the default observer'})"
                        for shape, keys in SHAPES.items()) + "; default lone,workers")  # fmt: skip
    parser.add_argument("--configurations", type=configurations, default=list(CONFIGURATIONS),
                        help=("comma-separated, beside nothing watched: " + "; ".join(CONFIGURATIONS) + "; default "
                              "all").replace("%", "%%"))  # fmt: skip
    args = parser.parse_args(argv)
    if not set(args.shapes) <= {"lone", *SHAPES}:
        parser.error(f"--shapes: lone, {', '.join(SHAPES)}")
    if args.hub_workers < 1:
        parser.error("--hub-workers must be >= 1")
    if not 0 < args.load <= 1:
        parser.error("--load must be in (0, 1]")
    return print_report("bench_observer", run, args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""What the soak test measures about the proxy process, the table it prints, and its verdict on leaks.

A ``Sample`` joins what the kernel says about the process (``/proc/PID``: resident memory, open file descriptors
and how many of them are sockets, threads) with what the proxy says about itself on ``/metrics`` (calls answered,
asyncio tasks, mirror and drift queues, predictions waiting for outcomes, drops).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.samples import Sample as MetricSample

from .scrape import by_label, drift_counts, mirror_counts, total

__all__ = ["Check", "Sample", "Soak", "proc_stats", "render", "sample_from", "verdict"]

MB = 1024.0 * 1024.0


def proc_stats(pid: int) -> tuple[float, int, int, int]:
    """(resident memory in MB, open file descriptors, of which sockets, threads) of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"])
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while we looked
            continue
        fds += 1
        sockets += target.startswith("socket:")
    return rss_kb / 1024.0, fds, sockets, threads


@dataclass
class Sample:
    """The proxy process at one point of the soak. Counters are cumulative since the proxy started."""

    label: str  # the table's first column
    calls: int  # client calls answered (mlmirror_calls_total)
    ok: int  # of which OK
    rss_mb: float
    fds: int
    sockets: int
    threads: int
    tasks: int  # mlmirror_process_tasks
    inflight: int  # client calls being served
    mirror_pending: int  # shadow copies in flight + queued
    drift_queued: int
    predictions: int  # predictions waiting for their outcome (mlmirror_outcomes_pending)
    mirror_finished: int
    mirror_dropped: dict[str, float]
    drift_counted: int
    drift_dropped: int
    drift_errors: int
    windows: int  # drift windows closed
    peak_mirror: int = 0  # highest mirror_pending polled since the previous sample
    peak_drift: int = 0  # highest drift_queued polled since the previous sample
    peak_tasks: int = 0  # highest task count polled since the previous sample
    rate: float = math.nan  # calls/s the load generator achieved since the previous sample
    p99_ms: float = math.nan  # its p99 latency over the same calls


def sample_from(label: str, pid: int, metrics: list[MetricSample]) -> Sample:
    """A ``Sample`` of process ``pid`` from /proc and its ``/metrics`` samples."""
    rss, fds, sockets, threads = proc_stats(pid)
    calls = by_label(metrics, "mlmirror_calls_total", "grpc_code")
    mirrors = mirror_counts(metrics).values()
    drops: dict[str, float] = {}
    for shadow in mirrors:
        for reason, n in shadow.drops.items():
            drops[reason] = drops.get(reason, 0.0) + n
    drift = drift_counts(metrics)
    return Sample(
        label=label,
        calls=int(sum(calls.values())),
        ok=int(calls.get("OK", 0)),
        rss_mb=rss,
        fds=fds,
        sockets=sockets,
        threads=threads,
        tasks=int(total(metrics, "mlmirror_process_tasks")),
        inflight=int(total(metrics, "mlmirror_inflight_calls")),
        mirror_pending=int(sum(m.pending for m in mirrors)),
        drift_queued=int(total(metrics, "mlmirror_drift_queued")),
        predictions=int(total(metrics, "mlmirror_outcomes_pending")),
        mirror_finished=int(sum(sum(m.results.values()) for m in mirrors)),
        mirror_dropped=drops,
        drift_counted=int(drift["mlmirror_drift_calls_total"]),
        drift_dropped=int(drift["mlmirror_drift_dropped_total"]),
        drift_errors=int(drift["mlmirror_drift_decode_errors_total"]),
        windows=int(drift["mlmirror_drift_windows_total"]),
    )


@dataclass
class Soak:
    """A whole soak run: samples before the load, every so many calls, and after the queues drained."""

    before: Sample
    during: list[Sample]
    after: Sample
    warmup: int  # calls after which memory is the baseline
    shadows: int  # shadows at 100%: copies expected per call
    load_seconds: float
    failed: int  # calls the load generator saw fail
    outcomes: dict[str, int] = field(default_factory=dict)  # side calls' outcomes, by result

    @property
    def baseline(self) -> Sample:
        """The first sample at or past the warm-up (the last one when none is)."""
        return next((s for s in self.during if s.calls >= self.warmup), self.during[-1])


@dataclass(frozen=True)
class Check:
    what: str
    passed: bool
    detail: str


def verdict(soak: Soak, max_rss_growth_mb: float, slack: int) -> list[Check]:
    """The leak checks. ``slack``: tasks, fds and threads the idle proxy may hold beyond the first figure (a
    connection the load generator just closed, the default executor's threads starting on first use)."""
    base, before, after = soak.baseline, soak.before, soak.after
    later = [s for s in soak.during if s.calls >= base.calls] + [after]
    peak = max(later, key=lambda s: s.rss_mb)
    growth = peak.rss_mb - base.rss_mb
    drops = sum(after.mirror_dropped.values())
    expected_copies = after.calls * soak.shadows
    modelinfer_ok = after.ok
    return [
        Check(
            "every call answered OK",
            soak.failed == 0 and after.ok == after.calls,
            f"{after.ok:,} of {after.calls:,} OK; {soak.failed} failed at the load generator",
        ),
        Check(
            f"RSS growth after warm-up < {max_rss_growth_mb:g} MB",
            growth < max_rss_growth_mb,
            f"{base.rss_mb:.1f} MB at {base.calls:,} calls, highest {peak.rss_mb:.1f} MB at {peak.calls:,} "
            f"(+{growth:.1f} MB); {after.rss_mb:.1f} MB after the drain; trend after warm-up "
            f"{_slope(later):+.2f} MB per 100k calls",
        ),
        Check(
            "asyncio tasks back to the idle count",
            after.tasks <= before.tasks + slack,
            f"{before.tasks} before the load, {after.tasks} after; at most {max(s.peak_tasks for s in soak.during)} "
            "polled under load",
        ),
        Check(
            "file descriptors back to the idle count",
            after.fds <= before.fds + slack,
            f"{before.fds} ({before.sockets} sockets) before the load, {after.fds} ({after.sockets} sockets) after",
        ),
        Check(
            "threads not growing",
            after.threads <= base.threads + slack,
            f"{before.threads} before the load, {base.threads} after warm-up, {after.threads} after",
        ),
        Check(
            "queues drained after the load",
            after.mirror_pending == after.drift_queued == after.inflight == 0,
            f"mirror in flight + queued {after.mirror_pending}, drift queued {after.drift_queued}, "
            f"calls in flight {after.inflight}",
        ),
        Check(
            "every mirror copy accounted for",
            after.mirror_finished + drops == expected_copies,
            f"{after.mirror_finished:,} finished + {drops:,.0f} dropped = {after.mirror_finished + drops:,.0f}; "
            f"sent to the mirror: {expected_copies:,} ({soak.shadows} shadow(s) at 100%)",
        ),
        Check(
            "every call seen by the drift engine",
            after.drift_counted + after.drift_dropped + after.drift_errors == modelinfer_ok,
            f"{after.drift_counted:,} counted + {after.drift_dropped:,} dropped + {after.drift_errors:,} decode "
            f"errors, of {modelinfer_ok:,} answered; {after.windows:,} windows closed",
        ),
        Check(
            "outcomes joined with their predictions",
            bool(soak.outcomes) and set(k for k, n in soak.outcomes.items() if n) <= {"matched", "early"},
            ", ".join(f"{k} {n:,}" for k, n in soak.outcomes.items() if n) or "none reported",
        ),
    ]


def _slope(samples: list[Sample]) -> float:
    """Least-squares slope of RSS against calls, in MB per 100,000 calls (NaN with fewer than 3 samples)."""
    if len(samples) < 3:
        return math.nan
    calls = np.array([s.calls for s in samples], dtype=np.float64)
    rss = np.array([s.rss_mb for s in samples])
    return float(np.polyfit(calls / 1e5, rss, 1)[0]) if np.ptp(calls) else math.nan


def _drops(sample: Sample) -> str:
    parts = [f"{reason} {n:,.0f}" for reason, n in sorted(sample.mirror_dropped.items()) if n]
    if sample.drift_dropped:
        parts.append(f"drift queue_full {sample.drift_dropped:,}")
    return ", ".join(parts) or "—"


def _number(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else f"{value:{spec}}"


def render(soak: Soak, checks: list[Check]) -> list[str]:
    """The markdown table of samples, then the checks and the verdict."""
    base = soak.baseline
    lines = [
        "| calls answered | RSS (MB) | ΔRSS since warm-up (MB) | asyncio tasks (polled max) | fds (sockets) "
        "| threads | mirror in flight + queued (polled max) | drift queued (polled max) | predictions pending "
        "| drops by reason | calls/s | p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in [soak.before, *soak.during, soak.after]:
        delta = f"{s.rss_mb - base.rss_mb:+.1f}" if s.calls >= base.calls and s is not soak.before else "—"
        lines.append(
            f"| {s.label} | {s.rss_mb:.1f} | {delta} | {s.tasks} ({s.peak_tasks or '—'}) | {s.fds} ({s.sockets}) "
            f"| {s.threads} | {s.mirror_pending} ({s.peak_mirror or '—'}) | {s.drift_queued} ({s.peak_drift or '—'}) "
            f"| {s.predictions:,} | {_drops(s)} | {_number(s.rate, '.0f')} | {_number(s.p99_ms, '.2f')} |"
        )
    passed = all(c.passed for c in checks)
    lines += ["", "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {c.what} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in checks]
    lines += ["", f"Verdict: {'PASS' if passed else 'FAIL'}"]
    return lines

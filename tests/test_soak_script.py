"""The soak script runs end to end on a few thousand calls (the same code path as the million-call run), and its
verdict fails when the figures say leak."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys

import pytest

from loadtest.soak_report import Sample, Soak, verdict
from tests.support import REPO


def _row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_a_small_soak_prints_its_table_and_passes():
    assert shutil.which("h2load") is not None, "h2load (Debian package nghttp2-client) is needed; .ci/run installs it"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.soak", "--calls", "5000", "--every", "1000", "--rate", "600",
         "--outcomes", "20"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| calls answered |")))
    table = [_row(line) for line in lines[header + 2 :] if line.startswith("| ")]
    samples = table[: next(i for i, row in enumerate(table) if row[0] == "check")]
    assert samples[0][0] == "before load"
    assert samples[-1][0].startswith("after the drain")
    during = samples[1:-1]
    assert len(during) == 5
    calls = [int(row[0].replace(",", "")) for row in during]
    # 1000 h2load calls between samples, plus the 20 outcome calls sent after each sample
    assert calls == [1000 + 20 * i + 1000 * i for i in range(5)]
    assert during[0][2] == "+0.0"  # the first sample is the warm-up baseline
    assert all(float(row[1]) > 10 for row in samples)  # RSS in MB, read from /proc
    mirror_after, drift_after = samples[-1][6], samples[-1][7]
    assert mirror_after.split()[0] == drift_after.split()[0] == "0"
    checks = {row[0]: (row[1], row[2]) for row in table[len(samples) + 1 :]}
    assert len(checks) == 9
    assert all(result == "pass" for result, _ in checks.values()), checks
    copies = re.fullmatch(r"([\d,]+) finished \+ ([\d,]+) dropped = ([\d,]+); sent to the mirror: ([\d,]+) .*",
                          checks["every mirror copy accounted for"][1])  # fmt: skip
    assert copies is not None
    finished, dropped, accounted, sent = (int(g.replace(",", "")) for g in copies.groups())
    assert finished + dropped == accounted == sent == 5100
    # early: reported before the busy drift engine stored the prediction, parked and joined when it lands
    joined = dict(part.split(" ") for part in checks["outcomes joined with their predictions"][1].split(", "))
    assert set(joined) <= {"matched", "early"}
    assert sum(int(n) for n in joined.values()) == 100
    assert lines[-1] == "Verdict: PASS"


def _sample(calls: int, rss: float, tasks: int = 11, fds: int = 24) -> Sample:
    return Sample(label=f"{calls:,}", calls=calls, ok=calls, rss_mb=rss, fds=fds, sockets=9, threads=15,
                  tasks=tasks, inflight=0, mirror_pending=0, drift_queued=0, predictions=0, mirror_finished=calls,
                  mirror_dropped={}, drift_counted=calls, drift_dropped=0, drift_errors=0, windows=0)  # fmt: skip


def test_the_verdict_fails_on_memory_growth_and_leaked_tasks_and_passes_when_flat():
    flat = [_sample(n, 200.0 + (n % 3)) for n in range(50_000, 1_000_001, 50_000)]
    before = _sample(0, 180.0)
    soak = Soak(before, flat, _sample(1_000_000, 201.0), warmup=50_000, shadows=1, load_seconds=1000.0,
                failed=0, outcomes={"matched": 2000})  # fmt: skip
    assert all(check.passed for check in verdict(soak, 50.0, 2))

    growing = [_sample(n, 200.0 + n / 10_000) for n in range(50_000, 1_000_001, 50_000)]  # +1 MB per 10k calls
    leaky = dataclasses.replace(soak, during=growing, after=_sample(1_000_000, 300.0, tasks=40, fds=60))
    failed = {check.what for check in verdict(leaky, 50.0, 2) if not check.passed}
    assert failed == {
        "RSS growth after warm-up < 50 MB",
        "asyncio tasks back to the idle count",
        "file descriptors back to the idle count",
    }
    growth = next(c for c in verdict(leaky, 50.0, 2) if c.what.startswith("RSS"))
    assert "+95.0 MB" in growth.detail  # 300 MB at the end against 205 MB at the warm-up sample
    assert "+10.00 MB per 100k calls" in growth.detail

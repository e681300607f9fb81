"""The observing process's wait while serving is busy (proxy/observing/servinggate.py), read off real processes: one
that sleeps and one that never stops running."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from mlmirror.observing.servinggate import ServingGate, asleep

pytestmark = pytest.mark.process


@pytest.fixture
def sleeper() -> Iterator[int]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 30
        while asleep(process.pid) is not True:  # until it has started and gone to sleep
            assert time.monotonic() < deadline, "the sleeping process never slept"
            time.sleep(0.05)
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def spinner() -> Iterator[int]:
    """A process whose main thread always runs (or waits for a CPU): state R."""
    process = subprocess.Popen([sys.executable, "-c", "print('go', flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "go\n"
        yield process.pid
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_a_sleeping_process_reads_asleep_and_a_spinning_one_does_not(sleeper, spinner):
    assert asleep(sleeper) is True
    assert asleep(spinner) is False
    assert asleep(2**22 + 12345) is None  # no such process


def test_the_gate_closes_while_every_watched_worker_runs_and_opens_while_one_sleeps(sleeper, spinner):
    gate = ServingGate(0.4, longest=0.05, active=60.0)  # the samples stay fresh however slowly the test runs
    gate.watch(spinner)
    for _ in range(60):
        gate.sample()
    assert gate.idle < 0.01  # 0.9 ** 60
    assert not gate.open
    gate.wait_sync()  # waits its longest, then lets the caller go on
    assert gate.timeouts == 1
    assert gate.waited > 0
    gate.watch(sleeper)  # some worker has time to spare
    for _ in range(60):
        gate.sample()
    assert gate.idle > 0.99
    assert gate.open
    gate.wait_sync()
    assert gate.timeouts == 1
    assert gate.snapshot() == {"limit": 0.4, "idle": round(gate.idle, 3), "waited_seconds": round(gate.waited, 3),
                               "timeouts": 1}  # fmt: skip


async def test_the_gate_samples_on_the_event_loop_and_waits_there_too(spinner):
    gate = ServingGate(0.4, longest=0.05, active=1.0)  # fresh through a stall of the test of up to 1 s
    gate.watch(spinner)
    gate.start()
    try:
        await asyncio.sleep(0.3)
        assert gate.samples == 0  # nothing was gated yet: no /proc reads
        deadline = time.monotonic() + 30
        while gate.open:  # a wait keeps the sampling task going, and it moves idle down
            assert time.monotonic() < deadline, "the gate never closed on a spinning worker"
            await gate.wait()
            await asyncio.sleep(0.01)
        assert gate.samples > 0
        await gate.wait()
        assert gate.timeouts == 1
        await asyncio.sleep(1.3)  # past the last wait's 1 s: the samples stop
        stopped = gate.samples
        await asyncio.sleep(0.3)
        assert gate.samples == stopped
    finally:
        await gate.stop()


def test_a_share_older_than_active_opens_the_gate_and_the_next_wait_starts_it_again(spinner):
    gate = ServingGate(0.4, longest=5.0, active=1.0)
    gate.watch(spinner)
    for _ in range(60):
        gate.sample()
    assert not gate.open  # a fresh share: every worker busy
    time.sleep(1.05)  # no samples for longer than ``active``: the share says nothing about serving now
    assert gate.stale
    assert gate.open
    gate.wait_sync()  # the drift thread, draining its queue after the calls stopped, does not wait on it
    assert gate.timeouts == 0
    assert gate.idle < 0.01  # kept, until a wait on the event loop starts the samples again

    async def one_wait() -> None:
        await gate.wait()
        await gate.stop()

    asyncio.run(one_wait())
    assert gate.idle == 1.0
    assert gate.timeouts == 0


def test_a_worker_that_is_gone_is_forgotten_and_off_never_waits(spinner):
    gate = ServingGate(0.4)
    gate.watch(2**22 + 12345)
    gate.sample()
    assert gate.idle == 1.0
    assert gate.open
    off = ServingGate(None)
    off.watch(spinner)
    for _ in range(60):
        off.sample()
    assert off.open
    assert off.idle == 1.0


def test_a_worker_that_exits_after_it_was_watched_is_forgotten(spinner):
    process = subprocess.Popen([sys.executable, "-c", "print('go', flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline() == "go\n"
    gate = ServingGate(0.4)
    gate.watch(process.pid)
    gate.watch(spinner)
    for _ in range(60):
        gate.sample()
    assert gate.idle < 0.01  # both run
    process.kill()
    process.wait()
    process.stdout.close()
    gate.sample()  # the exited one reads as gone: only the spinner is left
    assert gate.watched == [spinner]

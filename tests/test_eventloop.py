"""The start-up log names the event loop that runs, not the one that is installed: ``--no-uvloop`` says asyncio."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest
from mlmirror.eventloop import loop_factory, loop_name

from tests.support import mlmirror

pytestmark = pytest.mark.slow


def started_line(config: Path, *flags: str) -> str:
    """The start-up log line of ``mlmirror serve`` (with ``flags``); the process is stopped afterwards."""
    process = mlmirror("serve", "--config", str(config), *flags)
    try:
        assert process.stderr is not None
        for line in process.stderr:  # blocks until a line comes or the process ends
            if "event loop" in line:
                return line
        raise AssertionError(f"mlmirror serve exited ({process.wait()}) without logging its start")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.mark.parametrize(("flags", "expected"), [((), "uvloop"), (("--no-uvloop",), "asyncio")])
def test_the_start_up_log_names_the_loop_that_runs(tmp_path, flags, expected):
    if expected == "uvloop":
        assert loop_factory() is not None, "uvloop is a dependency of the proxy"
    config = tmp_path / "mlmirror.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstreams: {production: 127.0.0.1:1}\n"
        "routes: [{name: main, match: {}, primary: production}]\n"
    )
    line = started_line(config, *flags)
    assert line.rstrip().endswith(f"event loop {expected}"), line


def test_loop_name_reads_the_running_loop():
    assert asyncio.run(_name()) == "asyncio"
    factory = loop_factory()
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(_name()) == "uvloop"


async def _name() -> str:
    return loop_name()

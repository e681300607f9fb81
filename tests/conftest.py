"""Test configuration: coroutine tests run on their own event loop (uvloop, as the proxy does)."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys

import pytest

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mlmirror.eventloop import loop_factory


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests to completion on a fresh loop; fixtures stay synchronous."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(pyfuncitem.obj(**kwargs))
    return True


# `make check` leaves out the tests marked slow or process; a test that starts a child process without either mark
# would slip into it, so starting one is an error there (the audit events below are how Python starts processes).
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.fork"})
_running: list[pytest.Item] = []
_spawned: dict[str, str] = {}


def _audit(event: str, args: tuple) -> None:
    if event in _SPAWN_EVENTS and _running:
        _spawned.setdefault(_running[-1].nodeid, f"{event} {args[1] if event == 'subprocess.Popen' else args[0]!r}")


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    started = _spawned.pop(item.nodeid, None)
    if started and not (item.get_closest_marker("process") or item.get_closest_marker("slow")):
        pytest.fail(f"started a process ({started}): mark the test process (make check leaves those out)")

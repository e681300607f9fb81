"""Test configuration: coroutine tests run on their own event loop (uvloop, as the proxy does), and hypothesis runs
the same examples on every machine unless asked to explore.

Hypothesis profiles, chosen by ``$HYPOTHESIS_PROFILE``:

- ``ci`` (the default): derandomized (examples follow from each test's code, not from a random seed), no example
  database (examples found on one run cannot change what the next one runs), no deadline (a busy machine is no
  failure). ``make test`` runs this.
- ``explore``: random examples, at least 1000 per test (tests that set their own count take the larger), and the
  local ``.hypothesis`` database so that what a run finds is replayed first on the next. ``make explore`` (and
  ``make fuzz``) run this; a failure it finds becomes an ``@example`` in the test.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mlmirror.eventloop import loop_factory

PROFILES = ("ci", "explore")

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _profile not in PROFILES:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={_profile!r}: expected one of {', '.join(PROFILES)}")
settings.load_profile(_profile)


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


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {_profile}"


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

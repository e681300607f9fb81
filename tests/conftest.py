"""Test configuration: coroutine tests run on their own event loop (uvloop, as the proxy does)."""

from __future__ import annotations

import asyncio
import inspect
import os

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

"""Chaos under load: the scenarios of loadtest/chaos (killed, slow and failing primary; hung and killed shadow; a
raising drift engine; ten reloads; SIGTERM) on small runs, with their invariants: no client error where a fallback
exists, every mirror copy accounted for (finished + dropped + pending = sampled), the proxy serving afterwards.
Latency figures are for ``python -m loadtest.chaos``; only bounded-latency invariants are asserted here."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from mlmirror.config import parse_config

from loadtest.chaos.load import MODEL_INFER, requests
from loadtest.chaos.scenarios import SCENARIOS, Result, accounted, config_yaml
from loadtest.chaos.servers import serve_faulty
from tests.support import through_proxy, wait_until

pytestmark = pytest.mark.slow

CALLS = 400
RATE = 150.0


async def run(name: str) -> Result:
    result = await SCENARIOS[name](CALLS, RATE)
    for shadow, (sampled, total) in accounted(result).items():
        assert sampled == total, (shadow, result.scrape)  # finished + dropped + pending = sampled
        assert sampled >= result.calls
    tail = result.fault[-len(result.fault) // 10 :]
    if name != "sigterm":
        assert all(o.code == "OK" for o in tail), result.errors  # still serving at the end of the fault
    return result


async def test_a_killed_and_restarted_primary_costs_clients_nothing():
    result = await run("primary-killed")
    assert not result.errors
    assert result.served_by["baseline"] > 0
    assert result.scrape is not None
    assert result.scrape.fallbacks[("production", "baseline", "circuit_open")] > 0
    assert result.facts["recovered"] < 10.0  # production serves again after its restart


async def test_a_slow_primary_is_waited_for_not_fallen_back_from():
    result = await run("primary-slow")
    assert not result.errors
    assert set(result.served_by) == {"production"}
    assert result.scrape is not None
    assert not any(result.scrape.fallbacks.values())


async def test_a_failing_primary_falls_back_without_client_errors():
    result = await run("primary-failing")
    assert not result.errors
    assert result.served_by["baseline"] == len(result.fault)
    assert result.scrape is not None
    assert result.scrape.fallbacks[("production", "baseline", "circuit_open")] > 0


async def test_a_hung_shadow_never_delays_production():
    result = await run("shadow-hung")
    assert not result.errors
    assert max(o.latency for o in result.fault) < 10.0  # the hung shadow answers in an hour: no call waited
    assert result.scrape is not None
    copies = result.scrape.copies["candidate"]
    assert copies.finished.get("DEADLINE_EXCEEDED", 0) >= 5
    assert copies.dropped["circuit_open"] > 0


async def test_a_killed_shadow_is_dropped_behind_its_circuit():
    result = await run("shadow-killed")
    assert not result.errors
    assert result.scrape is not None
    copies = result.scrape.copies["candidate"]
    assert copies.finished.get("UNAVAILABLE", 0) > 0
    assert copies.dropped["circuit_open"] > 0


async def test_a_raising_drift_engine_costs_calls_nothing_and_recovers():
    """Fault injection: the scenario monkeypatches the real engine's ``offer`` and worker ``_process`` to raise."""
    result = await run("drift-raising")
    facts = result.facts
    assert not result.errors
    assert facts["raised"] == math.ceil(facts["offers"] / 2)  # every raising offer counted by the tap
    assert facts["lost"] > 0  # batches lost in the worker, counted as 'internal'
    assert facts["alive"]
    assert facts["counted_after"] >= 150


async def test_ten_reloads_under_load_fail_no_call_and_leak_no_copy():
    result = await run("reloads")
    facts = result.facts
    assert not result.errors
    assert facts["reloads"] == 10
    assert facts["controls"] == 5
    assert facts["control_leftover"] == 0
    assert sum(facts["control_copies"]) > 0  # the control shadow did get copies between reloads


async def test_sigterm_drains_calls_in_flight_and_refuses_new_ones_cleanly():
    result = await run("sigterm")
    facts = result.facts
    assert facts["returncode"] == 0, facts["stderr"]
    assert facts["in_flight"] > 0
    # Every call the proxy accepted completes, even under overload: none is CANCELLED by grpc's server.stop (it
    # reports not-ready, serves on for shutdown_delay, then refuses new calls before it stops: docs/RELIABILITY.md).
    assert facts["completed"] == facts["in_flight"], result.errors
    assert set(facts["refused"]) <= {"OK", "UNAVAILABLE"}  # served during shutdown_delay, refused after it
    assert set(result.errors) <= {"UNAVAILABLE"}  # never CANCELLED, INTERNAL, UNKNOWN or a broken stream
    assert not [o for o in result.baseline if o.code != "OK"]


async def test_copies_in_flight_when_a_reload_removes_their_shadow_are_counted():
    """Before, close() cancelled copies in flight without counting them: they were neither finished, dropped nor
    pending, and the books did not balance."""
    async with serve_faulty("production") as (_, primary), serve_faulty("candidate") as (shadow, shadow_port):
        shadow.delay = 3600.0
        with_shadow = config_yaml(primary, shadows={"candidate": shadow_port}).replace(
            "timeout: 300ms, max_inflight: 32, queue_size: 256", "timeout: 30s, max_inflight: 2, queue_size: 3"
        )
        async with through_proxy(with_shadow) as (proxy, channel):
            stub = channel.unary_unary(MODEL_INFER)
            for body in requests(5):
                await stub(body, timeout=5)
            mirror = proxy.parts.get("iris", "shadows").shadow("candidate")
            await wait_until(lambda: (mirror.inflight, mirror.queued) == (2, 3), what="2 copies in flight, 3 queued")
            await proxy.reload(parse_config(config_yaml(primary), "<chaos>"))
            await wait_until(lambda: mirror.inflight == 0, what="the copies in flight to be cancelled")
            await asyncio.sleep(0)
    assert mirror.stats.drops["closed"] == 3
    assert mirror.stats.results == {grpc.StatusCode.CANCELLED.name: 2}

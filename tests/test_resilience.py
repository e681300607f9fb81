"""The circuit breaker, driven by a hand-held clock (the time source is a parameter; nothing else is faked)."""

from __future__ import annotations

import grpc
import pytest
from mlmirror.config import CircuitPolicy
from mlmirror.serving.resilience import CircuitBreaker, CircuitState

FAIL = grpc.StatusCode.UNAVAILABLE
OK = grpc.StatusCode.OK


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, uniform: float = 0.5, **policy) -> CircuitBreaker:
    defaults = {"failures": 3, "ejection": 10.0, "max_ejection": 35.0, "jitter": 0.0}
    return CircuitBreaker(CircuitPolicy(**{**defaults, **policy}), clock=clock, uniform=lambda: uniform)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert b.allow()
        b.record(FAIL)


def test_opens_after_n_consecutive_failures_only():
    clock = Clock()
    b = breaker(clock)
    fail(b, 2)
    b.record(OK)  # a success resets the run
    fail(b, 2)
    assert b.state is CircuitState.CLOSED
    fail(b, 1)
    assert b.state is CircuitState.OPEN
    assert not b.allow()


def test_errors_that_prove_the_upstream_alive_do_not_count():
    b = breaker(Clock())
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL):
        fail(b, 2)
        b.record(code)
    assert b.state is CircuitState.CLOSED


def test_half_open_lets_exactly_one_probe_through():
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 10.0
    assert b.allow()
    assert b.state is CircuitState.HALF_OPEN
    assert not b.allow()
    assert not b.allow()
    b.record(OK)
    assert b.state is CircuitState.CLOSED
    assert b.allow()


def test_a_cancelled_probe_frees_the_slot_without_deciding():
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 10.0
    assert b.allow()
    b.record(grpc.StatusCode.CANCELLED)
    assert b.state is CircuitState.HALF_OPEN
    assert b.allow()


def test_ejection_doubles_per_consecutive_ejection_and_is_capped():
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    durations = []
    for _ in range(4):
        durations.append(b.open_until - clock.now)
        clock.now = b.open_until
        assert b.allow()  # the probe
        b.record(FAIL)
    assert durations == [10.0, 20.0, 35.0, 35.0]
    assert b.ejections == 5


def test_ejection_is_jittered_within_bounds():
    clock = Clock()
    low = breaker(clock, uniform=0.0, jitter=0.2)
    high = breaker(clock, uniform=0.999999, jitter=0.2)
    fail(low, 3)
    fail(high, 3)
    assert low.open_until - clock.now == pytest.approx(8.0)
    assert high.open_until - clock.now == pytest.approx(12.0, rel=1e-5)


def test_ejection_count_starts_over_after_a_healthy_stretch():
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now = b.open_until
    assert b.allow()
    b.record(FAIL)  # second ejection: 20 s
    clock.now = b.open_until
    assert b.allow()
    b.record(OK)
    clock.now += 35.0  # closed for max_ejection
    fail(b, 3)
    assert b.open_until - clock.now == 10.0


def test_the_probe_waits_until_the_upstream_can_be_reached():
    clock = Clock()
    reachable = [False]
    b = CircuitBreaker(
        CircuitPolicy(failures=1, ejection=1.0, max_ejection=1.0, jitter=0.0),
        clock=clock,
        probe_ready=lambda: reachable[0],
    )
    fail(b, 1)
    clock.now += 5.0
    assert not b.allow()
    assert b.state is CircuitState.OPEN
    reachable[0] = True
    assert b.allow()
    assert b.state is CircuitState.HALF_OPEN


def test_state_changes_are_reported():
    clock = Clock()
    seen = []
    b = CircuitBreaker(
        CircuitPolicy(failures=1, ejection=1.0, max_ejection=1.0, jitter=0.0), clock=clock, on_change=seen.append
    )
    fail(b, 1)
    clock.now += 1.0
    b.allow()
    b.record(OK)
    assert seen == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    assert b.snapshot()["state"] == "closed"

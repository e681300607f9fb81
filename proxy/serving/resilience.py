"""The per-upstream circuit breaker.

States: CLOSED (calls flow) → OPEN after ``failures`` consecutive failures (calls are refused, the route falls back)
→ HALF_OPEN when the ejection time has passed (exactly one probe call goes through) → CLOSED if the probe succeeds,
OPEN again, for longer, if it fails.

The n-th consecutive ejection lasts ``min(ejection * 2**(n-1), max_ejection) * (1 + jitter * u)`` seconds with ``u``
uniform in [-1, 1]: it grows per ejection, is capped, and is jittered so that replicas do not probe in lock-step.
The ejection count starts again from zero once the circuit has stayed closed for ``max_ejection`` seconds.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable

import grpc
from mlmirror.config import CircuitPolicy

__all__ = ["CircuitBreaker", "CircuitState"]


class CircuitState(enum.IntEnum):
    """Circuit states; the values are those of the ``mlmirror_circuit_state`` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Counts consecutive failures of one upstream and refuses calls to it while it is ejected.

    Not thread-safe: it lives on the event loop. ``clock`` returns seconds (monotonic); ``uniform`` returns a float in
    [0, 1). Both are parameters so that tests can drive time. ``probe_ready``, when given, is asked before the
    half-open probe is let through: while it says no (say, the channel has not reconnected yet), the circuit stays
    open rather than spend the probe on a call that cannot succeed.
    """

    def __init__(
        self,
        policy: CircuitPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
        on_change: Callable[[CircuitState], None] | None = None,
        probe_ready: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = policy
        self._probe_ready = probe_ready
        self._clock = clock
        self._uniform = uniform
        self._on_change = on_change
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.ejections = 0
        self.open_until = 0.0
        self._closed_at = clock()
        self._probe_in_flight = False

    def allow(self) -> bool:
        """Whether a call may go to the upstream now. In HALF_OPEN, True for exactly one caller (the probe)."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self._clock() < self.open_until or (self._probe_ready is not None and not self._probe_ready()):
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record(self, code: grpc.StatusCode) -> None:
        """Report the outcome of an allowed call.

        A status in the policy's codes is a failure; CANCELLED (the client gave up) says nothing about the upstream
        and only frees the probe slot; any other status, errors included, proves the upstream is answering.
        """
        if code in self.policy.codes:
            self._failure()
        elif code is grpc.StatusCode.CANCELLED:
            self._probe_in_flight = False
        else:
            self._success()

    def record_success(self) -> None:
        """``record(OK)``, for the hot path: in the closed state it is one attribute store."""
        if self.state is CircuitState.CLOSED:
            self.consecutive_failures = 0
        else:
            self._success()

    def _success(self) -> None:
        if self.state is CircuitState.CLOSED:
            self.consecutive_failures = 0
            return
        if self.state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False
            self.consecutive_failures = 0
            self._closed_at = self._clock()
            self._set(CircuitState.CLOSED)
        # OPEN: a call admitted before the circuit opened came back fine; the probe decides, not this.

    def _failure(self) -> None:
        if self.state is CircuitState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.policy.failures:
                self._open()
        elif self.state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False
            self._open()

    def _open(self) -> None:
        now = self._clock()
        if self.state is CircuitState.CLOSED and now - self._closed_at >= self.policy.max_ejection:
            self.ejections = 0
        self.ejections += 1
        base = min(self.policy.ejection * 2 ** (self.ejections - 1), self.policy.max_ejection)
        self.open_until = now + base * (1.0 + self.policy.jitter * (2.0 * self._uniform() - 1.0))
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for ``/status``; ``open_for_seconds`` is how long an open circuit stays open."""
        remaining = max(0.0, self.open_until - self._clock()) if self.state is CircuitState.OPEN else 0.0
        return {
            "state": self.state.name.lower(),
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "open_for_seconds": round(remaining, 3),
        }

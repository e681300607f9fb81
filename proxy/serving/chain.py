"""One call's walk along its route's fallback chain: which upstream next (skipping open circuits), with what
timeout (capped by the client's remaining deadline, seconds), and the fallback and attempt metrics on the way."""

from __future__ import annotations

import time
from typing import Any

import grpc
from mlmirror.serving.table import RouteRuntime
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["FallbackChain", "cancelled_attempt"]

_CANCELLED = grpc.StatusCode.CANCELLED


class FallbackChain:
    """Walks a route's fallback chain for one call: circuit breakers, the client's deadline, fallback metrics."""

    __slots__ = ("_from", "_next", "_reason", "deadline", "route", "skipped")

    def __init__(self, route: RouteRuntime, remaining: float | None) -> None:
        self.route = route
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self._next = 0
        self._from: str | None = None  # the upstream we are moving away from, and why
        self._reason = ""
        self.skipped: list[str] = []

    def next_target(self) -> tuple[UpstreamTarget, str, float | None] | None:
        """The next upstream to try, its role and its timeout (seconds); None when the chain or time ran out."""
        chain = self.route.chain
        while self._next < len(chain):
            target = chain[self._next]
            role = "primary" if self._next == 0 else "fallback"
            self._next += 1
            timeout = target.timeout
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if timeout is None or remaining < timeout:
                    timeout = remaining
            if self._from is not None:
                self.route.metrics.fallback(self._from, target.name, self._reason)
                self._from = None
            if not target.breaker.allow():
                self._from, self._reason = target.name, "circuit_open"
                self.skipped.append(target.name)
                continue
            return target, role, timeout
        return None

    def failed(self, target: UpstreamTarget, role: str, code: grpc.StatusCode, seconds: float, retry: bool) -> bool:
        """Record a failed attempt; True when the call should move on to the next target."""
        target.breaker.record(code)
        self.route.metrics.attempt(target.name, role, code.name, seconds)
        if retry and code in self.route.fallback_on:
            self._from, self._reason = target.name, code.name.lower()
            return True
        return False

    def finish(self, to: str) -> None:
        """The chain ended with a pending move: to the static default, or to ``none`` (the call fails)."""
        if self._from is not None:
            self.route.metrics.fallback(self._from, to, self._reason)
            self._from = None

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and self.deadline <= time.monotonic()


def cancelled_attempt(chain: FallbackChain, call: Any, target: UpstreamTarget, role: str, started: float) -> None:
    """The client went away (or its deadline passed) mid-attempt: cancel the upstream call, free a half-open probe
    slot, count the call."""
    call.cancel()
    target.breaker.record(_CANCELLED)
    code = grpc.StatusCode.DEADLINE_EXCEEDED if chain.out_of_time else _CANCELLED
    chain.route.metrics.attempt(target.name, role, code.name, time.perf_counter() - started)
    chain.route.metrics.answered(code.name)

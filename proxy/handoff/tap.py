"""The tap: where finished calls are handed to observers (shadow mirrors, the drift engine) off the critical path.

``Tap.offer`` never awaits and never raises: each observer must take a ``CallRecord`` in constant time (typically a
``put_nowait`` into its own bounded queue, counting what it drops), and an observer that raises is counted and
ignored. The bytes in a record are the very objects the proxy forwarded; observers decode them, never the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter

__all__ = ["CallRecord", "Observer", "Tap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One answered unary call, as the client saw it.

    ``response`` is None when the client got an error (``code``). ``served_by`` is the upstream that answered (or
    ``static-default``), ``role`` its place in the chain (``primary``, ``fallback``). ``metadata`` is what was sent
    upstream, including ``x-mlmirror-request-id``. ``started`` is Unix time (seconds); ``latency`` the seconds from
    the request's arrival to the answer; ``upstream_latency`` the seconds of the attempt that gave the answer.
    """

    route: str
    method: str
    request: bytes
    response: bytes | None
    code: grpc.StatusCode
    served_by: str
    role: str
    request_id: str
    metadata: tuple[tuple[str, str | bytes], ...]
    started: float
    latency: float
    upstream_latency: float


class Observer(Protocol):
    """Something fed by the tap. ``offer`` must return at once and must not block the event loop."""

    name: str

    def offer(self, record: CallRecord) -> None: ...


class Tap:
    """Fans records out to observers; counts those that raise in ``error_counter`` (a prometheus-client counter
    labelled by observer) and logs the first error of each."""

    __slots__ = ("_error_counter", "_observers", "_warned")

    def __init__(self, observers: Sequence[Observer], error_counter: Counter) -> None:
        self._observers = tuple(observers)
        self._error_counter = error_counter
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._observers)

    def with_observers(self, observers: Sequence[Observer]) -> Tap:
        """A tap feeding this one's observers and ``observers`` (say, one route's shadow mirror)."""
        return Tap((*self._observers, *observers), self._error_counter) if observers else self

    def offer(self, record: CallRecord) -> None:
        for observer in self._observers:
            try:
                observer.offer(record)
            except Exception:
                self._error_counter.labels(observer.name).inc()
                if observer.name not in self._warned:
                    self._warned.add(observer.name)
                    log.exception(
                        "observer %s raised; the call was answered anyway (further errors only counted)", observer.name
                    )

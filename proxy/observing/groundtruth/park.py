"""Outcomes that arrive before their prediction: parked until it lands, for ``feedback.early_ttl`` seconds at most.

A client that reports each label the instant its answer returns is faster than the drift engine, which remembers
the prediction a moment later on its own thread (proxy/observing/drift/engine.py). Such an outcome is **parked**
here instead of being counted ``unknown``: it is counted ``early`` in the answer to the report, and joined with its
prediction when a ground-truth store remembers the request id (``GroundTruthStore.remember`` hands it back through
``claim``). An outcome still parked after ``early_ttl`` seconds is dropped and counted ``unknown`` then; when
``early_max`` outcomes are parked, the oldest is dropped (counted ``unknown`` too, and ``evicted``) to make room.

Memory: 410 to 440 bytes per parked outcome with a 36-character id and one label (the id, two small lists, a
deadline, the dict entry; measured with tracemalloc, also after a flood of 100,000 ids that never come), so under
5 MB at the default ``early_max`` of 10,000, whatever the flood.

Thread-safe: outcomes are parked on the event loop, predictions land on the drift engine's worker thread. The
check "does a store know this id" and the parking are one step under the park's lock, and a store remembers an id
before it claims it, so an outcome is never parked after its prediction has landed unseen.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["OutcomePark", "ParkCollector", "ParkedOutcome"]

#: an outcome's values (regression) and labels (classification), as reported
ParkedOutcome = tuple[Sequence[float], Sequence[str]]


class OutcomePark:
    """Early outcomes by request id, oldest first, at most ``capacity`` of them, each for ``ttl`` seconds.

    ``clock``: seconds (monotonic; tests pass their own). ``expired`` and ``evicted`` count the outcomes dropped
    unjoined (the feedback service counts them ``unknown``); ``joined``, those handed back to their prediction."""

    def __init__(self, capacity: int, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 0:
            raise ValueError(f"the park's capacity must be 0 or more, not {capacity}")
        if ttl <= 0:
            raise ValueError(f"the park's ttl must be more than 0 seconds, not {ttl}")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._parked: OrderedDict[str, tuple[float, ParkedOutcome]] = OrderedDict()  # id -> (deadline, outcome)
        self.expired = 0
        self.evicted = 0
        self.joined = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def park_unless(self, known: Callable[[str], bool], request_id: str, outcome: ParkedOutcome) -> bool:
        """Park ``outcome`` unless ``known(request_id)`` (a store has its prediction, asked under the park's lock);
        True when it was parked. With a capacity of 0 nothing is parked."""
        with self._lock:
            self._expire(self._clock())
            if known(request_id) or self.capacity == 0:
                parked = False
            else:
                self._parked.pop(request_id, None)  # reported again while parked: the latest outcome stands
                self._parked[request_id] = (self._clock() + self.ttl, outcome)
                while len(self._parked) > self.capacity:
                    self._parked.popitem(last=False)
                    self.evicted += 1
                parked = True
        return parked

    def claim(self, request_id: str) -> ParkedOutcome | None:
        """The outcome parked for ``request_id`` (taken out of the park), or None."""
        with self._lock:
            if self._parked:
                self._expire(self._clock())
            entry = self._parked.pop(request_id, None)
            if entry is not None:
                self.joined += 1
        return None if entry is None else entry[1]

    def expire(self) -> int:
        """Drop the outcomes past their TTL now (otherwise done at the next park or claim); how many were."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        dropped = 0
        while self._parked:
            deadline, _ = next(iter(self._parked.values()))
            if deadline > now:
                break
            self._parked.popitem(last=False)
            dropped += 1
        self.expired += dropped
        return dropped


class ParkCollector(Collector):
    """``mlmirror_outcomes_early`` (parked now) and ``mlmirror_outcomes_early_dropped_total{reason}`` (dropped
    unjoined and counted ``unknown``: ``expired`` past the TTL, ``evicted`` to make room)."""

    def __init__(self, park: OutcomePark) -> None:
        self._park = park

    def collect(self) -> Iterator[Metric]:
        self._park.expire()
        yield GaugeMetricFamily(
            "mlmirror_outcomes_early", "Outcomes that arrived before their prediction, parked until it lands.",
            value=len(self._park),
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "mlmirror_outcomes_early_dropped", "Parked outcomes dropped unjoined (counted unknown), by reason.",
            labels=["reason"],
        )  # fmt: skip
        dropped.add_metric(["expired"], self._park.expired)
        dropped.add_metric(["evicted"], self._park.evicted)
        yield dropped

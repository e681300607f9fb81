"""Capture: a route's sampled calls written to rotating JSON-lines files, off the event loop.

``CaptureWriter.offer`` (on the event loop, before the client's answer) samples the call by its request id (as
shadows do: the same calls on every replica), then appends it to a bounded deque or counts it dropped. A writer
thread wakes every ``POLL`` seconds, encodes what is queued (proxy/observing/capture/record.py: redaction, base64,
decoded tensors) and appends it to the route's files (proxy/observing/capture/rotating.py), flushing after each batch.
Records are dropped and counted by reason, never raised:

- ``queue_full``: ``queue_size`` records already wait (the writer is behind);
- ``too_large``: the encoded record exceeds ``max_file_bytes``;
- ``unredactable``: the route redacts inputs and the request cannot be redacted (never written as it is);
- ``write_error``: the disk refused (full, permissions); the next record tries a new file;
- ``closed``: offered after a reload or stop closed the writer.

Outcomes reported later (``offer_outcome``, from the feedback path, on the event loop) are appended as outcome
records (see record.py) for the calls this writer captured: it remembers the ids of the last ``REMEMBERED_IDS``
calls it queued, and forgets an id once its outcome is queued (a repeated outcome is not written twice). Outcomes
go through the same queue and drop reasons as calls.

Memory held: at most ``queue_size`` records (their request and response bytes), and ``REMEMBERED_IDS`` ids.
``close()`` returns at once; the thread then writes what is queued, flushes, closes its file and ends. A writer
replacing another on the same directory (a reload) waits for that one's thread first, so files are never written by
two threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from mlmirror.config import Capture
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.capture.record import encode_outcome, encode_record
from mlmirror.observing.capture.rotating import RotatingFiles, TooLargeError
from mlmirror.protocol.kserve import TensorError
from mlmirror.serving.sampling import sampled
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DROP_REASONS", "CaptureCollector", "CaptureStats", "CaptureWriter"]

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between the writer's looks at the queue
DROP_REASONS = ("queue_full", "too_large", "unredactable", "write_error", "closed")
FILE_PREFIX = "capture"
#: Ids of captured calls remembered for their outcomes (about 160 bytes each: 16 MB per route at most).
REMEMBERED_IDS = 100_000


class OutcomeRecord(NamedTuple):
    """An outcome waiting to be written: ``reported`` is Unix seconds."""

    request_id: str
    values: tuple[float, ...]
    labels: tuple[str, ...]
    reported: float


class CaptureStats:
    """What a route's captures did; kept across reloads so that the exported counters never go back."""

    __slots__ = ("bytes", "disk_bytes", "drops", "files", "files_deleted", "outcomes", "records")

    def __init__(self) -> None:
        self.records = 0
        #: outcome records written
        self.outcomes = 0
        self.bytes = 0
        self.files = 0
        self.files_deleted = 0
        #: bytes in the files the current writer keeps
        self.disk_bytes = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)


class CaptureWriter:
    """The tap observer of one route's capture."""

    def __init__(
        self,
        route: str,
        spec: Capture,
        redact: tuple[str, ...] = (),
        stats: CaptureStats | None = None,
        after: Iterable[CaptureWriter] = (),
    ) -> None:
        self.name = f"capture:{route}"
        self.route = route
        self.spec = spec
        self.redact = redact
        self.stats = stats if stats is not None else CaptureStats()
        self._after = tuple(after)
        self._queue: deque[CallRecord | OutcomeRecord] = deque()
        #: ids of the calls queued, oldest first, waiting for their outcomes
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    # --- event loop side ------------------------------------------------------------------------------------------

    def offer(self, record: CallRecord) -> None:
        """Constant time: keep a sampled record for the writer, or count it dropped."""
        if not sampled(record.request_id, self.spec.percent):
            return
        if self._closed:
            self.stats.drops["closed"] += 1
        elif len(self._queue) >= self.spec.queue_size:
            self.stats.drops["queue_full"] += 1
        else:
            self._queue.append(record)
            if record.request_id:
                self._ids[record.request_id] = None
                if len(self._ids) > REMEMBERED_IDS:
                    self._ids.popitem(last=False)

    def offer_outcome(self, request_id: str, values: Sequence[float], labels: Sequence[str]) -> bool:
        """Constant time: queue an outcome record when this writer captured ``request_id`` (and has not written
        its outcome yet); False when it did not."""
        if self._ids.pop(request_id, False) is False:
            return False
        if self._closed:
            self.stats.drops["closed"] += 1
        elif len(self._queue) >= self.spec.queue_size:
            self.stats.drops["queue_full"] += 1
        else:
            self._queue.append(OutcomeRecord(request_id, tuple(values), tuple(labels), time.time()))
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Take no more records; the thread writes what is queued, closes its file and ends. Returns at once."""
        self._closed = True
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread (blocking: from the event loop, use ``asyncio.to_thread``)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self.close()
        self.join()

    def snapshot(self) -> dict[str, object]:
        """Settings and figures for ``/status``."""
        s = self.stats
        return {
            "path": self.spec.path,
            "percent": self.spec.percent,
            "include": self.spec.include,
            "redacted": list(self.redact),
            "records": s.records,
            "outcomes": s.outcomes,
            "bytes": s.bytes,
            "files": s.files,
            "files_deleted": s.files_deleted,
            "disk_bytes": s.disk_bytes,
            "queued": self.queued,
            "dropped": dict(s.drops),
        }

    # --- writer thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        for predecessor in self._after:
            predecessor.join()
        files = RotatingFiles(Path(self.spec.path), FILE_PREFIX, self.spec.max_file_bytes, self.spec.max_files)
        try:
            while not self._stop.wait(POLL):
                self._drain(files)
            self._drain(files)
        finally:
            files.close()
            self.stats.disk_bytes = files.disk_bytes

    def _drain(self, files: RotatingFiles) -> None:
        """Write everything queued now, then flush."""
        started, deleted, written = files.files_started, files.files_deleted, files.bytes_written
        while self._queue:
            self._write(files, self._queue.popleft())
        try:
            files.flush()
        except OSError as exc:
            self._failed("write_error", exc)
        s = self.stats
        s.files += files.files_started - started
        s.files_deleted += files.files_deleted - deleted
        s.bytes += files.bytes_written - written
        s.disk_bytes = files.disk_bytes

    def _write(self, files: RotatingFiles, record: CallRecord | OutcomeRecord) -> None:
        outcome = isinstance(record, OutcomeRecord)
        try:
            if isinstance(record, OutcomeRecord):
                line = encode_outcome(self.route, *record)
            else:
                line = encode_record(record, self.spec, self.redact)
        except TensorError as exc:
            self._failed("unredactable", exc)
            return
        except Exception as exc:  # an encoder bug must cost a record, never the thread
            self._failed("internal", exc)
            return
        try:
            files.write(line)
        except TooLargeError as exc:
            self._failed("too_large", exc)
            return
        except OSError as exc:
            self._failed("write_error", exc)
            return
        if outcome:
            self.stats.outcomes += 1
        else:
            self.stats.records += 1

    def _failed(self, reason: str, exc: Exception) -> None:
        self.stats.drops[reason] = self.stats.drops.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(
                "capture of route %s: record dropped (%s): %s; further ones only counted", self.route, reason, exc
            )


class CaptureCollector(Collector):
    """Exports every route's capture figures at scrape time."""

    def __init__(self, writers: Callable[[], Iterable[CaptureWriter]]) -> None:
        self._writers = writers

    def collect(self) -> Iterator[Metric]:
        route = ["route"]
        records = CounterMetricFamily("mlmirror_capture_records", "Calls written to capture files.", labels=route)
        outcomes = CounterMetricFamily(
            "mlmirror_capture_outcomes", "Outcome records appended to capture files.", labels=route
        )
        written = CounterMetricFamily("mlmirror_capture_bytes", "Bytes written to capture files.", labels=route)
        files = CounterMetricFamily("mlmirror_capture_files", "Capture files started.", labels=route)
        deleted = CounterMetricFamily(
            "mlmirror_capture_files_deleted", "Capture files deleted to keep at most max_files.", labels=route
        )
        dropped = CounterMetricFamily(
            "mlmirror_capture_dropped", "Sampled calls not captured, by reason.", labels=[*route, "reason"]
        )
        queued = GaugeMetricFamily("mlmirror_capture_queued", "Records waiting for the writer thread.", labels=route)
        disk = GaugeMetricFamily(
            "mlmirror_capture_disk_bytes", "Bytes in the capture files kept (at most max_files x max_file_bytes).",
            labels=route,
        )  # fmt: skip
        for writer in self._writers():
            s, name = writer.stats, [writer.route]
            records.add_metric(name, s.records)
            outcomes.add_metric(name, s.outcomes)
            written.add_metric(name, s.bytes)
            files.add_metric(name, s.files)
            deleted.add_metric(name, s.files_deleted)
            for reason, n in list(s.drops.items()):
                dropped.add_metric([writer.route, reason], n)
            queued.add_metric(name, writer.queued)
            disk.add_metric(name, s.disk_bytes)
        yield from (records, outcomes, written, files, deleted, dropped, queued, disk)

"""The drift engine of one route: fed answered calls by the tap, it counts them in windows and compares each window
with the reference, off the event loop.

``offer`` (on the event loop, before the client's answer) appends the record to a bounded deque — or counts it
dropped (``queue_full``). A worker thread wakes every ``POLL`` seconds, takes what is queued, decodes it (KServe V2
request inputs and response outputs, per ``schema``), and adds the rows to the current window of the call's model
version with the Numba kernels (which release the GIL). The first ``capture`` calls build the reference when no
profile is configured. A window closes after ``window`` calls of one version or ``window_time`` seconds; its scores
are computed from counts and published (``latest``, ``history``, and the ``sliding`` view). The worker hands the GIL
back to the event loop every ``yield_every`` calls: ``YIELD_EVERY`` where that loop serves clients (a lone proxy),
``YIELD_EVERY_OBSERVING`` in the observing process, whose loop serves no client and where each hand-back costs
a GIL switch (about 20 µs per call at 4, measured in docs/BENCHMARKS.md). Calls that cannot be decoded are
counted by reason, never raised.
At most ``max_versions`` model versions are tracked (``versions``); what a window is called is in ``judging``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mlmirror import kernels
from mlmirror.config import Drift
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.attribution import AttributionState, AttributionTracker, tracker_for
from mlmirror.observing.drift.binding import choose_input
from mlmirror.observing.drift.judging import Judge
from mlmirror.observing.drift.multivariate import PcaDrift, PcaState, fit_pca
from mlmirror.observing.drift.quality import QualityMonitor
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows, Schema, discover
from mlmirror.observing.drift.scoring import EngineSnapshot, SeriesResult, WindowResult, concat, sum_counts
from mlmirror.observing.drift.versions import RecentKeys
from mlmirror.observing.groundtruth.outcomes import GroundTruthStore
from mlmirror.protocol.kserve import Tensor, TensorError, request_inputs, response_outputs
from mlmirror.protocol.names import MODEL_INFER
from mlmirror.serving.sampling import sampled

__all__ = ["DriftEngine", "EngineSnapshot", "SeriesResult", "WindowResult"]

log = logging.getLogger(__name__)

POLL = 0.02  # seconds between the worker's looks at the queue
#: Calls decoded between two offers of the GIL to the event loop (~30 µs each): the loop never waits long for it.
YIELD_EVERY = 4
#: The same in the observing process, whose event loop only takes hand-offs and makes shadow copies.
YIELD_EVERY_OBSERVING = 64


@dataclass
class _Open:
    """A window being filled."""

    counts: WindowCounts
    started: float
    index: int
    attribution: AttributionState | None = None
    pca: PcaState | None = None


class DriftEngine:
    """The tap observer of one route's drift monitoring."""

    def __init__(
        self,
        route: str,
        spec: Drift,
        reference: Reference | None = None,
        *,
        yield_every: int = YIELD_EVERY,
        wait: Callable[[], None] | None = None,
    ) -> None:
        """``wait``: called by the drift thread before each batch (the observing process's wait while serving is
        busy, proxy/observing/servinggate.py)."""
        self.name = f"drift:{route}"
        self.yield_every = yield_every
        self._wait = wait
        self.route = route
        self.spec = spec
        self.reference = reference
        self.schema: Schema | None = reference.schema if reference is not None else None
        self._queue: deque[CallRecord] = deque()
        self._captured: list[Rows] = []
        self._captured_calls = 0
        self._open: dict[tuple[str, str], _Open] = {}
        self._lock = threading.Lock()
        self.latest: dict[tuple[str, str], WindowResult] = {}
        self.history: deque[WindowResult] = deque(maxlen=spec.history)
        self.windows: dict[tuple[str, str], int] = {}
        self.dropped: dict[str, int] = {"queue_full": 0}
        #: calls counted into windows that were dropped with their model version (retired, see ``versions``)
        self.retired_calls = 0
        self.decode_errors: dict[str, int] = {}
        self.accepted = 0
        self.ground_truth = (
            GroundTruthStore(spec.ground_truth, spec.history, max_versions=spec.max_versions)
            if spec.ground_truth
            else None
        )
        #: model and data quality per window (label-free estimate, data-quality checks, segments; see ``quality``)
        self.quality = QualityMonitor(route, spec)
        if self.ground_truth is not None and self.quality.truth is not None:
            self.ground_truth.joined = self.quality.joined
        #: the (model, version) pairs tracked, at most ``max_versions``; ``versions.retired`` counts those dropped
        self.versions: RecentKeys[tuple[str, str]] = RecentKeys(spec.max_versions)
        self._tracker: AttributionTracker | None = None
        self.pca: PcaDrift | None = None
        #: scores and judges each window's series (its ``calibrated`` thresholds come from the reference)
        self.judge = Judge(route, spec)
        self._recent: dict[tuple[str, str], deque[tuple[WindowCounts, float]]] = {}
        self.sliding: dict[tuple[str, str], WindowResult] = {}
        #: the latest closed window's counts per model version (exported for the series in ``export_bins``)
        self.latest_counts: dict[tuple[str, str], WindowCounts] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ambiguity_logged = False
        self._taken = 0  # calls of the batch the worker is decoding (see ``queued``)

    # --- event loop side ------------------------------------------------------------------------------------------

    def offer(self, record: CallRecord) -> None:
        """Constant time: keep the record for the worker, or count it dropped."""
        if record.response is None or record.method != MODEL_INFER:
            return
        if self.spec.percent < 100.0 and not sampled(record.request_id, self.spec.percent):
            return
        if len(self._queue) >= self.spec.queue_size:
            self.dropped["queue_full"] += 1
            return
        self._queue.append(record)

    def bind_input(self, tensor: str) -> None:
        """Let the profile's features that name no input read the model's input ``tensor`` (see ``binding``)."""
        assert self.schema is not None
        self.schema = self.schema.bind(tensor)
        if self.reference is not None:
            self.reference.schema = self.schema
        log.info("drift %s: the profile's unnamed input is the model's input %r", self.route, tensor)

    @property
    def queued(self) -> int:
        """Calls not yet counted: waiting for the worker, or in the batch it is decoding (0: every offered call is
        in the windows, its prediction stored for ground truth)."""
        return len(self._queue) + self._taken

    def start(self) -> None:
        kernels.warm_up()  # compile (or load) the kernels now, not on the first window
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # --- worker thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            if self._wait is not None:
                self._wait()
            self.drain()

    def drain(self, now: float | None = None) -> None:
        """Process everything queued now (the worker calls it; tests may too), then close the windows older than
        ``window_time`` at ``now`` (Unix time, seconds; default: the clock's)."""
        batch = []
        while self._queue:
            self._taken += 1  # counted before it leaves the queue: ``queued`` never dips below the truth
            batch.append(self._queue.popleft())
        try:
            if batch:
                self._process(batch)
            self._close_expired(time.time() if now is None else now)
        except Exception:  # a bug here must cost a batch of statistics, never the thread
            self._count_error("internal", len(batch))
            log.exception("drift engine of route %s: a batch of %d calls was lost", self.route, len(batch))
        finally:
            self._taken = 0

    def _close_expired(self, now: float) -> None:
        """Close the windows older than ``window_time`` (those with calls; an empty window just goes on)."""
        if self.spec.window_time is None:
            return
        for key, window in list(self._open.items()):
            if now - window.started >= self.spec.window_time and window.counts.calls:
                self._close(key)

    def _process(self, batch: list[CallRecord]) -> None:
        pending: dict[tuple[str, str], list[Rows]] = {}
        for i, record in enumerate(batch):
            if i % self.yield_every == self.yield_every - 1 and self._thread is threading.current_thread():
                time.sleep(0)  # hand the GIL back to the event loop between short stretches of decoding
            decoded = self._decode(record)
            if decoded is None:
                continue
            key, rows, outputs = decoded
            self.accepted += 1
            retired = self.versions.see(key)
            if retired is not None:
                self._retire(retired, pending.pop(retired, []))
            if self.reference is None:
                self._capture(rows, key)
                continue
            self.quality.observe(key, record.request_id, outputs, rows, self.reference)
            group = pending.setdefault(key, [])
            group.append(rows)
            window = self._window(key)
            if self.spec.window is not None and window.counts.calls + len(group) >= self.spec.window:
                self._add(window, group)
                pending[key] = []
                self._close(key)
        for key, group in pending.items():
            if group:
                self._add(self._window(key), group)

    def _decode(self, record: CallRecord) -> tuple[tuple[str, str], Rows, list[Tensor]] | None:
        try:
            model, inputs = request_inputs(record.request)
            version, outputs = response_outputs(record.response or b"")
            if self.schema is None:
                self.schema = discover(self.spec, inputs, outputs)
            elif self.schema.unbound:  # the model's metadata did not say which input it is: this call does
                self._bind_from_call([t.name for t in inputs])
            rows = self.schema.rows(inputs, outputs)
            key = (model or self.route, version or self.spec.model_version)
            if self.ground_truth is not None:
                self.ground_truth.remember(record.request_id, key, self.ground_truth.predictions(outputs))
        except TensorError as exc:
            self._count_error(exc.reason)
            return None
        return key, rows, outputs

    def _bind_from_call(self, inputs: list[str]) -> None:
        """Bind the profile's unnamed input to the only input of a call; a call with several is an error (its
        reason ``ambiguous_input``; logged once), and the next call is tried."""
        preferred = self.reference.preferred_input if self.reference is not None else None
        try:
            tensor = choose_input(inputs, preferred)
        except ValueError as exc:
            if not self._ambiguity_logged:
                self._ambiguity_logged = True
                log.warning("drift %s: calls are not windowed until one has a single input: %s", self.route, exc)
            raise TensorError("ambiguous_input", str(exc)) from None
        self.bind_input(tensor)

    def _count_error(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.decode_errors[reason] = self.decode_errors.get(reason, 0) + n

    def _capture(self, rows: Rows, key: tuple[str, str]) -> None:
        self._captured.append(rows)
        self._captured_calls += 1
        if self._captured_calls >= self.spec.capture:
            assert self.schema is not None
            rows = concat(self._captured)
            self.reference = Reference.build(
                self.schema, rows, self.spec.bins, calls=self._captured_calls, model=key[0], version=key[1]
            )
            tracker = self._attribution_tracker()
            if tracker is not None:
                state = tracker.new_state()
                tracker.add(state, rows.numeric)
                tracker.baseline = tracker.importance(state)
            window_rows = self._window_rows(rows.numeric.shape[0] / max(self._captured_calls, 1))
            if self.spec.multivariate is not None:  # fitted on the captured rows (a profile file holds none)
                self.pca = fit_pca(self.spec.multivariate, rows.numeric[:, self._features()], window_rows, self.route)
            size = max(1, round(window_rows))
            self.judge.calibrate(self.reference, self.schema, rows, size)
            self._captured = []
            log.info(
                "drift %s: reference captured from %d calls (%d rows) of %s version %s",
                self.route, self._captured_calls, rows.numeric.shape[0], key[0], key[1],
            )  # fmt: skip

    def _retire(self, key: tuple[str, str], pending: list[Rows]) -> None:
        """Drop what is kept for model version ``key`` (retired by a newer one): its open window (its calls, and
        ``pending`` calls of this batch, count in ``retired_calls``), its latest results and series."""
        window = self._open.pop(key, None)
        self._recent.pop(key, None)
        self.judge.forget(key)
        with self._lock:
            self.retired_calls += len(pending) + (window.counts.calls if window is not None else 0)
            for kept in (self.latest, self.windows, self.latest_counts, self.sliding):
                kept.pop(key, None)
        if self.ground_truth is not None:
            self.ground_truth.retire(key)
        self.quality.retire(key)
        if self.versions.retired == 1 or self.versions.retired % 1000 == 0:
            log.warning(
                "drift %s: more than %d model versions; the least recently seen are retired (%d so far, now %s v%s)",
                self.route, self.spec.max_versions, self.versions.retired, key[0], key[1],
            )  # fmt: skip

    def _window(self, key: tuple[str, str]) -> _Open:
        window = self._open.get(key)
        if window is None:
            assert self.reference is not None
            index = self.windows.get(key, 0)
            tracker = self._attribution_tracker()
            window = self._open[key] = _Open(
                self.reference.new_window(),
                time.time(),
                index,
                tracker.new_state() if tracker else None,
                self.pca.new_state() if self.pca else None,
            )
        return window

    def _window_rows(self, rows_per_call: float) -> float:
        """Rows a window is expected to hold (a time-only window is assumed as large as the capture)."""
        return (self.spec.window or self.spec.capture) * rows_per_call

    def _features(self) -> list[int]:
        assert self.schema is not None
        return [i for i, s in enumerate(self.schema.numeric) if s.kind == "feature"]

    def _attribution_tracker(self) -> AttributionTracker | None:
        """The tracker for ``spec.attribution``, once the schema is known; None when off or not possible."""
        spec = self.spec.attribution
        if spec is None or self.schema is None:
            return None
        if self._tracker is None:
            self._tracker = tracker_for(spec, self.schema, self.route)
        return self._tracker

    def _add(self, window: _Open, group: list[Rows]) -> None:
        assert self.reference is not None
        rows = concat(group)
        self.reference.add(window.counts, rows)
        window.counts.calls += len(group)
        if window.attribution is not None and self._tracker is not None:
            self._tracker.add(window.attribution, rows.numeric)
        if window.pca is not None and self.pca is not None:
            self.pca.add(window.pca, rows.numeric[:, self._features()])

    def _close(self, key: tuple[str, str]) -> None:
        window = self._open.pop(key)
        result = self.score(window.counts, key, window.index, window.started, window.attribution, window.pca)
        result = self.judge.persist(key, result)  # which series drifted in m of the last n windows
        self.quality.close(key, window.index, window.counts, self.reference)
        sliding = None
        if self.spec.sliding:
            recent = self._recent.setdefault(key, deque(maxlen=self.spec.sliding))
            recent.append((window.counts, window.started))
            sliding = self.score(sum_counts([c for c, _ in recent]), key, window.index, recent[0][1])
        with self._lock:
            self.windows[key] = window.index + 1
            self.latest[key] = result
            self.latest_counts[key] = window.counts
            self.history.append(result)
            if sliding is not None:
                self.sliding[key] = sliding

    # --- scoring --------------------------------------------------------------------------------------------------

    def score(
        self,
        counts: WindowCounts,
        key: tuple[str, str],
        index: int,
        started: float,
        attribution: AttributionState | None = None,
        pca: PcaState | None = None,
        *,
        against: WindowCounts | None = None,
    ) -> WindowResult:
        """Scores of ``counts`` against the reference (or against the counts ``against``, in the reference's bins),
        by every configured method."""
        assert self.reference is not None
        assert self.schema is not None
        series = self.judge.series(self.reference, self.schema, counts, against)
        names = [self.schema.numeric[i].name for i in self._tracker.features] if self._tracker else []
        return WindowResult(
            self.route,
            key[0],
            key[1],
            index,
            counts.calls,
            counts.rows,
            started,
            time.time(),
            tuple(series),
            self._tracker.result(attribution, names) if attribution is not None and self._tracker else None,
            self.pca.result(pca) if pca is not None and self.pca is not None else None,
        )

    @property
    def calibrated(self) -> dict[tuple[str, str], float]:
        """The per-series distance thresholds calibrated on the reference (see ``judging``)."""
        return self.judge.calibrated

    # --- what the outside sees ------------------------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            latest = dict(self.latest)
            history = list(self.history)
            windows = dict(self.windows)
            errors = dict(self.decode_errors)
            sliding = dict(self.sliding)
            counts = dict(self.latest_counts)
        return {
            "latest": latest,
            "history": history,
            "windows": windows,
            "decode_errors": errors,
            "sliding": sliding,
            "counts": counts,
        }

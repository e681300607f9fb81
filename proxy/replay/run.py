"""``mlmirror replay``: read the capture and the gate, send the calls, score them, judge, write the reports.

Exit codes: ``PASS`` (0) the gate passes, ``FAIL`` (1) it fails, ``COULD_NOT_RUN`` (2) the replay could not run
(unreadable capture or one without usable calls, unreachable target, bad gate file). Each ends with one line on
stderr saying why; stdout gets the criteria as a table.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mlmirror.config import MODEL_INFER
from mlmirror.errors import ConfigError, ReplayError
from mlmirror.protocol.kserve import Tensor, TensorError, response_outputs
from mlmirror.replay.captured import CaptureContents, CapturedCall, GroundTruthRecord, read_capture
from mlmirror.replay.criteria import evaluate
from mlmirror.replay.gate import Gate, load_gate
from mlmirror.replay.prediction_drift import prediction_drift
from mlmirror.replay.quality import score_quality
from mlmirror.replay.reports import ReplayReport, write_reports
from mlmirror.replay.scoring import compared, score_calls
from mlmirror.replay.sender import Answer, SendOptions, send_calls

__all__ = ["COULD_NOT_RUN", "FAIL", "PASS", "ReplayJob", "replay", "run_replay"]

PASS, FAIL, COULD_NOT_RUN = 0, 1, 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayJob:
    """What to replay where: ``limit`` None sends every usable call; ``report`` None writes no reports."""

    captures: tuple[Path, ...]
    target: str
    gate: Path | None = None
    report: Path | None = None
    limit: int | None = None
    send: SendOptions = field(default_factory=SendOptions)


def run_replay(job: ReplayJob, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run ``job``; the exit code, with the one-line reason on ``err``."""
    try:
        report = asyncio.run(replay(job, _progress(err)))
    except ReplayError as exc:
        print(f"mlmirror replay: could not run: {exc}", file=err)
        return COULD_NOT_RUN
    width = max(len(c.name) for c in report.criteria)
    for c in report.criteria:
        print(f"{c.name.ljust(width)}  {c.status:7}  {c.detail}", file=out)
    if job.report is not None:
        try:
            write_reports(report, job.report)
        except OSError as exc:
            print(f"mlmirror replay: could not run: cannot write the reports: {exc}", file=err)
            return COULD_NOT_RUN
    if report.passed:
        print(f"mlmirror replay: gate passed: {len(report.criteria)} criteria on {report.sent} calls", file=err)
        return PASS
    failed = "; ".join(c.summary for c in report.failed)
    print(f"mlmirror replay: gate failed: {failed}", file=err)
    return FAIL


Progress = Callable[[int, int], None]


async def replay(job: ReplayJob, progress: Progress | None = None) -> ReplayReport:
    """The replay's findings; raises ``ReplayError`` when it cannot run."""
    gate = _gate(job.gate)
    capture = read_capture(list(job.captures), limit=job.limit)
    if not capture.calls:
        raise ReplayError(_nothing_to_send(capture))
    started = time.monotonic()
    answers = await send_calls(capture.calls, job.target, job.send, progress)
    scores = score_calls(capture.calls, answers, gate.compare)
    decoded = list(_decoded(capture.calls, answers))
    drift = None if gate.drift is None else prediction_drift(((p, c) for _, p, c in decoded), gate.drift)
    quality = score_quality(_labelled(decoded, capture), gate.quality)
    criteria = evaluate(gate, scores, drift, quality)
    return ReplayReport(job.target, gate, capture, len(answers), scores, drift, quality, criteria,
                        time.monotonic() - started)  # fmt: skip


def _gate(path: Path | None) -> Gate:
    if path is None:
        return Gate()
    try:
        return load_gate(path)
    except ConfigError as exc:
        raise ReplayError(f"bad gate file: {exc}") from None


def _nothing_to_send(capture: CaptureContents) -> str:
    why = [f"{capture.lines} lines in {len(capture.files)} files"]
    if capture.malformed_lines:
        why.append(f"{capture.malformed_lines} malformed")
    if capture.without_request:
        why.append(f"{capture.without_request} calls without request bytes (captured with include: response?)")
    return "no usable calls in the capture (" + ", ".join(why) + ")"


def _decoded(calls: list[CapturedCall], answers: list[Answer]) -> Iterator[tuple[str, list[Tensor], list[Tensor]]]:
    """(request id, production outputs, candidate outputs) of the compared ModelInfer calls that both decode."""
    for call, answer in zip(calls, answers, strict=True):
        if call.method != MODEL_INFER or not compared(call, answer):
            continue
        assert call.response is not None
        assert answer.response is not None
        try:
            yield call.request_id, response_outputs(call.response)[1], response_outputs(answer.response)[1]
        except TensorError:
            continue  # counted by the comparison already (an incomparable answer)


def _labelled(
    decoded: list[tuple[str, list[Tensor], list[Tensor]]], capture: CaptureContents
) -> Iterator[tuple[GroundTruthRecord, list[Tensor], list[Tensor]]]:
    for request_id, production, candidate in decoded:
        outcome = capture.outcomes.get(request_id)
        if outcome is not None:
            yield outcome, production, candidate


def _progress(err: TextIO) -> Progress | None:
    """A progress line on a terminal (redrawn at most every 0.2 s); nothing when ``err`` is not one."""
    if not err.isatty():
        return None
    shown = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - shown[0] < 0.2:
            return
        shown[0] = now
        filled = 30 * done // max(total, 1)
        end = "\n" if done == total else ""
        print(f"\rreplaying [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=err, flush=True)

    return show

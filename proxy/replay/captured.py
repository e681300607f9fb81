"""Reading a capture back for a replay: the calls to send, production's answers to them, and their outcomes.

A capture is a JSON-lines file or a directory of them (``*.jsonl``, rotated files included, read oldest first by
name; see proxy/observing/capture/record.py for the format). A call record is *usable* when it holds the request
bytes of a unary call (``include: request`` or ``both``); production's answer is there with ``include: both``.
Outcome records are joined to calls by request id (the first outcome of an id counts; later ones are counted as
``duplicate_outcomes``).

A line that is not JSON, not an object, or lacks what a call needs (``method``, ``request`` in base64, a known
``code``) is *malformed*: counted by reason with the first few locations, never fatal. Calls without request bytes
are counted as ``without_request``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from mlmirror.errors import ReplayError
from mlmirror.observing.capture.record import OUTCOME
from mlmirror.observing.capture.rotating import SUFFIX

__all__ = ["CaptureContents", "CapturedCall", "GroundTruthRecord", "capture_files", "read_capture"]

#: Malformed lines whose location is kept for the report (the rest are only counted).
EXAMPLES = 10
_CODES = {code.name: code for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class GroundTruthRecord:
    """An outcome reported for a captured call: numbers (regression) or labels (classification)."""

    values: tuple[float, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CapturedCall:
    """One captured unary call. Latencies in seconds (NaN when not known); ``response`` None when production's
    answer was an error or was not captured (``include: request``); ``redacted``: the inputs zeroed in ``request``."""

    request_id: str
    route: str
    method: str
    model_name: str | None
    request: bytes
    response: bytes | None
    code: grpc.StatusCode
    latency: float
    upstream_latency: float
    redacted: tuple[str, ...] = ()
    location: str = ""
    #: production answered itself (``role: primary``), not a fallback or the static default
    primary: bool = True


@dataclass
class CaptureContents:
    """What a capture holds: usable calls in file order, outcomes by request id, and what could not be used."""

    calls: list[CapturedCall] = field(default_factory=list)
    outcomes: dict[str, GroundTruthRecord] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    lines: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    malformed_examples: list[str] = field(default_factory=list)
    without_request: int = 0
    duplicate_outcomes: int = 0

    @property
    def malformed_lines(self) -> int:
        return sum(self.malformed.values())

    def _bad(self, reason: str, where: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1
        if len(self.malformed_examples) < EXAMPLES:
            self.malformed_examples.append(f"{where}: {reason}")


def capture_files(path: Path) -> list[Path]:
    """The capture files of ``path`` (a file, or a directory's ``*.jsonl`` oldest first); raises ``ReplayError``."""
    if path.is_dir():
        files = sorted(path.glob(f"*{SUFFIX}"))
        if not files:
            raise ReplayError(f"{path}: no capture files (*{SUFFIX}) in the directory")
        return files
    if not path.exists():
        raise ReplayError(f"{path}: no such capture file or directory")
    return [path]


def read_capture(paths: list[Path], *, limit: int | None = None) -> CaptureContents:
    """Every usable call (at most ``limit``) and every outcome in the capture files or directories ``paths``.
    Raises ``ReplayError`` when a path is missing or unreadable; malformed lines are only counted."""
    contents = CaptureContents()
    for path in paths:
        for file in capture_files(path):
            contents.files.append(str(file))
            try:
                for number, line in _lines(file):
                    contents.lines += 1
                    _read_line(contents, line, f"{file}:{number}", limit)
            except OSError as exc:
                raise ReplayError(f"{file}: cannot read the capture: {exc.strerror or exc}") from None
    return contents


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    with open(file, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, line


def _read_line(contents: CaptureContents, line: bytes, where: str, limit: int | None) -> None:
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        contents._bad("not_json", where)
        return
    if not isinstance(entry, dict):
        contents._bad("not_an_object", where)
        return
    if entry.get("record") == OUTCOME:
        _read_outcome(contents, entry, where)
        return
    if limit is not None and len(contents.calls) >= limit:
        return
    method, code = entry.get("method"), _CODES.get(str(entry.get("code")))
    if not isinstance(method, str) or not method.startswith("/"):
        contents._bad("bad_method", where)
        return
    if code is None:
        contents._bad("bad_code", where)
        return
    if entry.get("request") is None:
        contents.without_request += 1
        return
    request, response = _bytes(entry.get("request")), _bytes(entry.get("response"))
    if not isinstance(request, bytes) or response is False:
        contents._bad("bad_base64", where)
        return
    redacted = entry.get("redacted") or ()
    request_id = entry.get("request_id")
    model = entry.get("model_name")
    contents.calls.append(
        CapturedCall(
            request_id=request_id if isinstance(request_id, str) else "",
            route=str(entry.get("route") or ""),
            method=method,
            model_name=model if isinstance(model, str) else None,
            request=request,
            response=response if code is grpc.StatusCode.OK and isinstance(response, bytes) else None,
            code=code,
            latency=_seconds(entry.get("latency")),
            upstream_latency=_seconds(entry.get("upstream_latency")),
            redacted=tuple(str(name) for name in redacted) if isinstance(redacted, list) else (),
            location=where,
            primary=entry.get("role", "primary") == "primary",
        )
    )


def _read_outcome(contents: CaptureContents, entry: dict, where: str) -> None:
    request_id, values, labels = entry.get("request_id"), entry.get("values", []), entry.get("labels", [])
    if not isinstance(request_id, str) or not isinstance(values, list) or not isinstance(labels, list):
        contents._bad("bad_outcome", where)
        return
    try:
        numbers = tuple(float(v) for v in values)  # "NaN", "Infinity" read back as floats
    except (TypeError, ValueError):
        contents._bad("bad_outcome", where)
        return
    if request_id in contents.outcomes:
        contents.duplicate_outcomes += 1
        return
    contents.outcomes[request_id] = GroundTruthRecord(numbers, tuple(str(label) for label in labels))


def _bytes(value: object) -> bytes | bool | None:
    """Base64 text as bytes; None for null; False when it is not base64 text."""
    if value is None:
        return None
    if not isinstance(value, str):
        return False
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return math.nan

"""The reports of a replay, written to one directory:

- ``report.md``: a summary fit for a pull-request comment or ``$GITHUB_STEP_SUMMARY``: the verdict, each criterion
  with its value, threshold and result, the worst disagreeing requests by id, and what could not be used;
- ``junit.xml``: one testcase per criterion (a failure carries the numbers; a skipped criterion is ``<skipped>``),
  so that CI systems show the gate as tests;
- ``report.json``: everything, machine-readable (NaN written as null).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from mlmirror.replay.captured import CaptureContents
from mlmirror.replay.criteria import Criterion, format_number
from mlmirror.replay.gate import Gate
from mlmirror.replay.prediction_drift import DriftScore
from mlmirror.replay.quality import QualityScore
from mlmirror.replay.scoring import ReplayScores

__all__ = ["ReplayReport", "write_reports"]


@dataclass
class ReplayReport:
    """Everything a replay found."""

    target: str
    gate: Gate
    capture: CaptureContents
    sent: int
    scores: ReplayScores
    drift: DriftScore | None
    quality: QualityScore | None
    criteria: list[Criterion]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.criteria)

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if c.passed is False]

    def to_json(self) -> dict[str, object]:
        s = self.scores.summary
        c = self.capture
        return _clean({
            "verdict": "pass" if self.passed else "fail",
            "target": self.target,
            "seconds": self.seconds,
            "gate": {"source": self.gate.source, "promotion": asdict(self.gate.promotion),
                     "compare": asdict(self.gate.compare),
                     "drift": asdict(self.gate.drift) if self.gate.drift else None,
                     "quality": asdict(self.gate.quality)},
            "capture": {"files": c.files, "lines": c.lines, "calls": len(c.calls), "outcomes": len(c.outcomes),
                        "malformed": c.malformed, "malformed_lines": c.malformed_lines,
                        "malformed_examples": c.malformed_examples, "without_request": c.without_request,
                        "duplicate_outcomes": c.duplicate_outcomes},
            "calls": {"sent": self.sent, "compared": s.compared, "not_compared": self.scores.not_compared,
                      "redacted": self.scores.redacted, "candidate_codes": self.scores.candidate_codes,
                      "production_codes": self.scores.production_codes,
                      "comparison_errors": self.scores.comparison_errors},
            "comparison": {"agree": s.agree, "samples": s.samples, "agreement": s.agreement, "mae": s.mae,
                           "rmse": s.rmse, "abs_max": s.abs_max},
            "errors": {"candidate_ratio": s.shadow_error_ratio, "production_ratio": s.production_error_ratio},
            "latency_seconds": {"candidate_p50": self.scores.candidate_p50, "candidate_p99": s.shadow_p99,
                                "production_p50": self.scores.production_p50, "production_p99": s.production_p99},
            "drift": None if self.drift is None else {
                "method": self.drift.method, "calls": self.drift.calls, "rows": self.drift.rows,
                "errors": self.drift.errors,
                "series": [{"name": r.name, "categorical": r.categorical, "method": r.method, "scores": r.scores,
                            "threshold": r.threshold, "drifted": r.drifted} for r in self.drift.series]},
            "quality": None if self.quality is None else asdict(self.quality),
            "criteria": [{**asdict(k), "status": k.status} for k in self.criteria],
            "worst": [asdict(w) for w in self.scores.worst],
        })  # fmt: skip


def write_reports(report: ReplayReport, directory: Path) -> list[Path]:
    """Write the three reports into ``directory`` (created); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "report.md", directory / "junit.xml", directory / "report.json"]
    paths[0].write_text(markdown(report), encoding="utf-8")
    paths[1].write_bytes(junit(report))
    paths[2].write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return paths


def markdown(report: ReplayReport) -> str:
    s = report.scores.summary
    verdict = "✅ passed" if report.passed else f"❌ failed ({len(report.failed)} of {len(report.criteria)} criteria)"
    lines = [
        f"## mlmirror replay: {verdict}",
        "",
        f"{report.sent} captured calls replayed against `{report.target}` in {report.seconds:.1f} s; "
        f"{s.compared} compared with production's answers.",
        "",
        "| criterion | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for c in report.criteria:
        lines.append(f"| {c.name} | {format_number(c.value)} | {format_number(c.threshold)} | {c.status} |")
    lines += ["", *(f"- **{c.name}**: {c.detail}" for c in report.criteria)]
    codes = report.scores.candidate_codes
    if set(codes) - {"OK"}:
        lines += ["", "Candidate answers by code: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))]
    if report.scores.worst:
        lines += ["", "### Worst disagreeing requests", "", "| request id | disagreement | max abs diff | error |",
                  "|---|---|---|---|"]  # fmt: skip
        for w in report.scores.worst:
            lines.append(f"| `{w.request_id or w.location}` | {w.disagreement:.2f} | {format_number(w.abs_max)} | "
                         f"{w.error or ''} |")  # fmt: skip
    c = report.capture
    notes = []
    if c.malformed_lines:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(c.malformed.items()))
        first = c.malformed_examples[0]
        notes.append(f"{c.malformed_lines} malformed capture lines skipped ({reasons}); first: {first}")
    if c.without_request:
        notes.append(f"{c.without_request} captured calls without request bytes (include: response) not replayed")
    unanswered = sum(1 for call in c.calls if call.response is None and call.code.name == "OK")
    if unanswered:
        notes.append(f"{unanswered} calls without production's answer in the capture (include: request): not compared")
    if report.scores.redacted:
        notes.append(f"{report.scores.redacted} calls with redacted inputs: replayed, not compared")
    if notes:
        lines += ["", *(f"> {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def junit(report: ReplayReport) -> bytes:
    failures = len(report.failed)
    skipped = sum(c.passed is None for c in report.criteria)
    suite = ET.Element("testsuite", name="mlmirror replay", tests=str(len(report.criteria)), failures=str(failures),
                       errors="0", skipped=str(skipped), time=f"{report.seconds:.3f}")  # fmt: skip
    for c in report.criteria:
        case = ET.SubElement(suite, "testcase", classname="mlmirror.replay", name=c.name)
        if c.passed is False:
            failure = ET.SubElement(case, "failure", message=c.summary)
            failure.text = c.detail
        elif c.passed is None:
            ET.SubElement(case, "skipped", message=c.detail)
        else:
            ET.SubElement(case, "system-out").text = c.detail
    suites = ET.Element("testsuites", name="mlmirror replay", tests=suite.get("tests", "0"), failures=str(failures))
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _clean(value: object) -> object:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value

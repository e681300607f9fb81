"""What the quality monitor shows (``quality``): Prometheus families, ``/status`` entries, ``mlmirror drift`` lines."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from mlmirror.observing.drift.quality import QualityMonitor, QualityWindow
from mlmirror.observing.figures import json_number
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["QualityFamilies", "quality_lines", "quality_status"]

VERSION = ["route", "model", "version"]


class QualityFamilies:
    """The quality families of one scrape: ``add`` each route's monitor, then ``families``."""

    def __init__(self) -> None:
        self.accuracy = GaugeMetricFamily(
            "mlmirror_quality_estimated_accuracy",
            "Label-free estimate of the accuracy of the latest drift window (calibrated probabilities, docs/DRIFT.md).",
            labels=VERSION,
        )
        self.f1 = GaugeMetricFamily(
            "mlmirror_quality_estimated_f1", "Label-free estimate of the macro F1 of the latest drift window.",
            labels=VERSION,
        )  # fmt: skip
        self.calibrated = GaugeMetricFamily(
            "mlmirror_quality_estimate_calibrated",
            "1 when the latest window's estimate used probabilities calibrated on a labelled reference (0: assumed "
            "calibrated).",
            labels=VERSION,
        )
        self.below = GaugeMetricFamily(
            "mlmirror_quality_estimate_below_target",
            "1 when the estimated accuracy has been below ground_truth.target for ground_truth.target_windows windows "
            "in a row (0 without a target).",
            labels=VERSION,
        )
        self.ratio = GaugeMetricFamily(
            "mlmirror_data_quality_ratio",
            "Share of the latest window's rows failing a data-quality check (missing, out_of_range, unseen_category).",
            labels=[*VERSION, "series", "check"],
        )
        self.detected = GaugeMetricFamily(
            "mlmirror_data_quality_detected",
            "1 when the check's share exceeds the reference's by more than its drift.data_quality threshold.",
            labels=[*VERSION, "series", "check"],
        )
        self.segment_rows = GaugeMetricFamily(
            "mlmirror_segment_rows", "Rows of each segment in the latest window.", labels=[*VERSION, "segment"]
        )
        self.segment_share = GaugeMetricFamily(
            "mlmirror_segment_prediction_share", "Share of a segment's rows predicted as each class, latest window.",
            labels=[*VERSION, "segment", "class"],
        )  # fmt: skip
        self.segment_estimated = GaugeMetricFamily(
            "mlmirror_segment_estimated_accuracy", "Label-free accuracy estimate per segment, latest window.",
            labels=[*VERSION, "segment"],
        )  # fmt: skip
        self.segment_accuracy = GaugeMetricFamily(
            "mlmirror_segment_accuracy", "Realized accuracy per segment, latest window of outcome rows.",
            labels=[*VERSION, "segment"],
        )  # fmt: skip
        self.gap = GaugeMetricFamily(
            "mlmirror_segment_gap",
            "Largest gap between segments of the latest window: demographic_parity (prediction shares), "
            "estimated_accuracy, accuracy.",
            labels=[*VERSION, "gap"],
        )

    def add(self, route: str, monitor: QualityMonitor) -> None:
        for window in monitor.snapshot().values():
            key = [route, window.model, window.version]
            if window.rows:
                self.accuracy.add_metric(key, window.estimated_accuracy)
                self.f1.add_metric(key, window.estimated_f1)
                self.calibrated.add_metric(key, 1 if window.calibrated else 0)
                self.below.add_metric(key, 1 if window.below_target else 0)
            for check in window.data:
                self.ratio.add_metric([*key, check.series, check.check], check.ratio)
                self.detected.add_metric([*key, check.series, check.check], 1 if check.detected else 0)
            for segment in window.segments:
                self.segment_rows.add_metric([*key, segment.name], segment.rows)
                self.segment_estimated.add_metric([*key, segment.name], segment.estimated_accuracy)
                self.segment_accuracy.add_metric([*key, segment.name], segment.accuracy)
                for c, share in enumerate(segment.shares):
                    self.segment_share.add_metric([*key, segment.name, str(c)], share)
            for name, value in (window.gaps or {}).items():
                self.gap.add_metric([*key, name], value)

    def families(self) -> Iterator[Metric]:
        yield from (self.accuracy, self.f1, self.calibrated, self.below, self.ratio, self.detected)
        yield from (self.segment_rows, self.segment_share, self.segment_estimated, self.segment_accuracy, self.gap)


def quality_status(
    monitor: QualityMonitor, violations: Mapping[str, int], realized: Mapping[tuple[str, str], float] | None = None
) -> dict[str, object]:
    """The ``quality`` part of a route's ``/status`` drift entry; ``violations``: the engine's decode errors;
    ``realized``: the latest realized accuracy per (model, version), shown next to the estimate."""
    realized = realized or {}
    truth = monitor.truth
    calibration = monitor.calibration()
    return {
        "estimate": None
        if truth is None
        else {
            "target": truth.target,
            "target_windows": truth.target_windows,
            "calibration_rows": truth.calibration,
            "calibration": "isotonic per class, rows renormalised",
            "labelled": {f"{m} v{v}": n for (m, v), n in calibration.items()},
            "unestimated_calls": monitor.unestimated,
        },
        "segment": monitor.spec.segment,
        "segment_error": monitor.segment_error,
        "data_quality_thresholds": dict(monitor.spec.data_quality),
        "violations": {
            "type": sum(n for reason, n in violations.items() if reason in TYPE_REASONS),
            "shape": sum(n for reason, n in violations.items() if reason in SHAPE_REASONS),
        },
        "latest": [
            {**_window(w), "realized_accuracy": json_number(realized.get((w.model, w.version), math.nan))}
            for w in monitor.snapshot().values()
        ],
    }


#: Decode-error reasons that are type violations of an input or output, and shape violations.
TYPE_REASONS = frozenset({"dtype_mismatch", "unknown_datatype", "not_numeric"})
SHAPE_REASONS = frozenset(
    {"shape_mismatch", "row_mismatch", "missing_tensor", "missing_output", "bad_shape", "raw_count", "byte_length"}
)


def _window(window: QualityWindow) -> dict[str, object]:
    return {
        "model": window.model,
        "version": window.version,
        "index": window.index,
        "rows": window.rows,
        "estimated_accuracy": json_number(window.estimated_accuracy),
        "estimated_f1": json_number(window.estimated_f1),
        "calibrated": window.calibrated,
        "assumed_calibrated": window.rows > 0 and not window.calibrated,
        "below_target": window.below_target,
        "low_windows": window.low_windows,
        "data_quality": [
            {
                "series": d.series,
                "kind": d.kind,
                "check": d.check,
                "ratio": json_number(d.ratio),
                "reference": json_number(d.reference),
                "detected": d.detected,
            }
            for d in window.data
        ],
        "segments": [
            {
                "name": s.name,
                "rows": s.rows,
                "shares": [json_number(x) for x in s.shares],
                "estimated_accuracy": json_number(s.estimated_accuracy),
                "accuracy": json_number(s.accuracy),
                "outcome_rows": s.outcome_rows,
            }
            for s in window.segments
        ],
        "gaps": None if window.gaps is None else {k: json_number(v) for k, v in window.gaps.items()},
    }


def quality_lines(quality: Mapping | None) -> list[str]:
    """``mlmirror drift`` lines for a route's ``quality`` status entry."""
    if not quality:
        return []
    lines = []
    for w in quality["latest"]:
        if w["rows"]:
            how = "calibrated" if w["calibrated"] else "assumed calibrated"
            real = w.get("realized_accuracy")
            lines.append(
                f"  {w['model']} v{w['version']} window {w['index']} estimate ({how}): accuracy "
                f"{_fmt(w['estimated_accuracy'])}, macro F1 {_fmt(w['estimated_f1'])}; realized accuracy {_fmt(real)}"
                + (f"; BELOW TARGET for {w['low_windows']} windows" if w["below_target"] else "")
            )
        flagged = [f"{d['series']} {d['check']} {_fmt(d['ratio'])}" for d in w["data_quality"] if d["detected"]]
        lines.append("    data quality: " + (", ".join(flagged) if flagged else "no check flagged"))
        if w["segments"]:
            lines.append(f"    segments by {quality['segment']} (rows, estimated / realized accuracy, shares):")
            for s in w["segments"]:
                shares = " ".join(_fmt(x) for x in s["shares"])
                lines.append(
                    f"      {s['name']}: {s['rows']}, {_fmt(s['estimated_accuracy'])} / {_fmt(s['accuracy'])}, {shares}"
                )
            lines.append("    gaps: " + ", ".join(f"{k} {_fmt(v)}" for k, v in (w["gaps"] or {}).items()))
    violations = quality["violations"]
    if violations["type"] or violations["shape"]:
        lines.append(f"  calls rejected: {violations['type']} type, {violations['shape']} shape violations")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"

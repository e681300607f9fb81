"""What the drift engines show: Prometheus families (built at scrape time), ``/status`` entries, a CLI table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from mlmirror.kernels.methods import DRIFT_METHODS
from mlmirror.observing.drift.engine import DriftEngine, WindowResult
from mlmirror.observing.drift.quality_report import QualityFamilies, quality_lines, quality_status
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.report_alarms import AlarmFamilies
from mlmirror.observing.figures import json_number
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DriftCollector", "drift_status", "render_drift"]


class DriftCollector(Collector):
    """Exports the latest window of every model version of every route's drift engine."""

    def __init__(self, engines: Callable[[], Iterable[DriftEngine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        version = ["route", "model", "version"]
        score = GaugeMetricFamily(
            "mlmirror_drift_score",
            "Drift score of a feature or output in the latest window, by method "
            f"({', '.join(name for name, m in DRIFT_METHODS.items() if m.p_value)}: p-values).",
            labels=[*version, "series", "kind", "method"],
        )
        detected = GaugeMetricFamily(
            "mlmirror_drift_detected",
            "1 when the series drifted in the latest window by the route's detect method.",
            labels=[*version, "series", "kind"],
        )
        share = GaugeMetricFamily(
            "mlmirror_drift_feature_share", "Share of input features that drifted in the latest window.", labels=version
        )
        calls = GaugeMetricFamily("mlmirror_drift_window_calls", "Calls in the latest window.", labels=version)
        rows = GaugeMetricFamily("mlmirror_drift_window_rows", "Rows in the latest window.", labels=version)
        windows = CounterMetricFamily("mlmirror_drift_windows", "Windows closed.", labels=version)
        records = CounterMetricFamily("mlmirror_drift_calls", "Calls counted by the drift engine.", labels=["route"])
        dropped = CounterMetricFamily(
            "mlmirror_drift_dropped", "Calls the drift engine had no room for, by reason.", labels=["route", "reason"]
        )
        queued = GaugeMetricFamily(
            "mlmirror_drift_queued", "Calls waiting for the drift engine's worker.", labels=["route"]
        )
        retired = CounterMetricFamily(
            "mlmirror_drift_versions_retired",
            "Model versions (or model names) the route stopped tracking, their windows and series dropped: the least "
            "recently seen, each time one more than drift.max_versions was seen.",
            labels=["route"],
        )
        errors = CounterMetricFamily(
            "mlmirror_drift_decode_errors",
            "Calls the drift engine could not read, by reason.",
            labels=["route", "reason"],
        )
        reference_rows = GaugeMetricFamily(
            "mlmirror_drift_reference_rows", "Rows in the route's reference (0 while it is being captured).",
            labels=["route"],
        )  # fmt: skip
        quality = GaugeMetricFamily(
            "mlmirror_quality", "Model quality against reported outcomes in the latest window, by metric.",
            labels=[*version, "metric"],
        )  # fmt: skip
        quality_rows = GaugeMetricFamily(
            "mlmirror_quality_window_rows", "Outcome rows in the latest quality window.", labels=version
        )
        outcomes = CounterMetricFamily(
            "mlmirror_outcomes", "Reported outcomes by result (matched, unknown, late, duplicate, invalid).",
            labels=["route", "result"],
        )  # fmt: skip
        pending = GaugeMetricFamily(
            "mlmirror_outcomes_pending", "Predictions waiting for their outcome.", labels=["route"]
        )
        attribution_ndcg = GaugeMetricFamily(
            "mlmirror_drift_attribution_ndcg",
            "NDCG of the latest window's feature-importance ranking against the reference's (1: same ranking).",
            labels=version,
        )
        attribution_detected = GaugeMetricFamily(
            "mlmirror_drift_attribution_detected",
            "1 when the latest window's NDCG is below the threshold.",
            labels=version,
        )
        importance = GaugeMetricFamily(
            "mlmirror_drift_attribution_importance", "Feature importance in the latest window.",
            labels=[*version, "series"],
        )  # fmt: skip
        pca_error = GaugeMetricFamily(
            "mlmirror_drift_pca_reconstruction_error",
            "Mean squared PCA reconstruction error of the latest window's standardized features.",
            labels=version,
        )
        pca_detected = GaugeMetricFamily(
            "mlmirror_drift_multivariate_detected",
            "1 when the latest window's reconstruction error is above the calibrated bound.",
            labels=version,
        )
        sliding_share = GaugeMetricFamily(
            "mlmirror_drift_sliding_feature_share",
            "Share of input features drifted over the sliding view (the last `sliding` windows together).",
            labels=version,
        )
        sliding_detected = GaugeMetricFamily(
            "mlmirror_drift_sliding_detected", "1 when the series drifted over the sliding view.",
            labels=[*version, "series", "kind"],
        )  # fmt: skip
        window_bins = GaugeMetricFamily(
            "mlmirror_drift_window_bins",
            "Counts per bin of the latest window, for the series in export_bins (bin: slot index, underflow first, "
            "NaN left out; categories in vocabulary order, then other). Summed over replicas for fleet-wide drift.",
            labels=[*version, "series", "bin"],
        )
        reference_bins = GaugeMetricFamily(
            "mlmirror_drift_reference_bins", "Reference counts per bin, for the series in export_bins.",
            labels=["route", "series", "bin"],
        )  # fmt: skip
        qualities = QualityFamilies()
        alarms = AlarmFamilies()
        for engine in self._engines():
            qualities.add(engine.route, engine.quality)
            # Read once: the worker publishes the reference (never changes it) meanwhile, and one scrape shows one.
            reference = engine.reference
            snapshot = engine.snapshot()
            _export_bins(engine, reference, snapshot["counts"], window_bins, reference_bins)
            alarms.add(engine.route, snapshot)
            if engine.ground_truth is not None:
                truth = engine.ground_truth.snapshot()
                pending.add_metric([engine.route], truth["pending"])
                for outcome, n in truth["results"].items():
                    outcomes.add_metric([engine.route, outcome], n)
                for window in truth["latest"].values():
                    key = [engine.route, window.model, window.version]
                    quality_rows.add_metric(key, window.rows)
                    for metric, value in window.metrics.items():
                        quality.add_metric([*key, metric], value)
            route = engine.route
            records.add_metric([route], engine.accepted)
            queued.add_metric([route], engine.queued)
            retired.add_metric([route], engine.versions.retired)
            for reason, n in engine.dropped.items():
                dropped.add_metric([route, reason], n)
            for reason, n in snapshot["decode_errors"].items():
                errors.add_metric([route, reason], n)
            reference_rows.add_metric([route], reference.counts.rows if reference is not None else 0)
            for (model, ver), n in snapshot["windows"].items():
                windows.add_metric([route, model, ver], n)
            for result in snapshot["sliding"].values():
                key = [route, result.model, result.version]
                sliding_share.add_metric(key, result.feature_drift_share)
                for series in result.series:
                    sliding_detected.add_metric([*key, series.name, series.kind], 1 if series.drifted else 0)
            for result in snapshot["latest"].values():
                key = [route, result.model, result.version]
                share.add_metric(key, result.feature_drift_share)
                calls.add_metric(key, result.calls)
                rows.add_metric(key, result.rows)
                if result.multivariate is not None:
                    pca_error.add_metric(key, result.multivariate.error)
                    pca_detected.add_metric(key, 1 if result.multivariate.drifted else 0)
                if result.attribution is not None:
                    attribution_ndcg.add_metric(key, result.attribution.ndcg)
                    attribution_detected.add_metric(key, 1 if result.attribution.drifted else 0)
                    for name, value in result.attribution.importance.items():
                        importance.add_metric([*key, name], value)
                for series in result.series:
                    detected.add_metric([*key, series.name, series.kind], 1 if series.drifted else 0)
                    for method, value in series.scores.items():
                        score.add_metric([*key, series.name, series.kind, method], value)
        yield from (score, detected, share, calls, rows, windows, records, queued, dropped, retired, errors)
        yield from alarms.families()
        yield reference_rows
        yield from (quality, quality_rows, outcomes, pending, attribution_ndcg, attribution_detected, importance)
        yield from (pca_error, pca_detected, sliding_share, sliding_detected, window_bins, reference_bins)
        yield from qualities.families()


def _export_bins(
    engine: DriftEngine,
    reference: Reference | None,
    latest: Mapping[tuple[str, str], WindowCounts],
    window_bins: GaugeMetricFamily,
    reference_bins: GaugeMetricFamily,
) -> None:
    """Per-bin counts of the series named in ``export_bins`` (opt-in: a series of n bins is n + 2 series)."""
    wanted = set(engine.spec.export_bins)
    schema = reference.schema if reference is not None else None
    if not wanted or reference is None or schema is None:
        return

    def distributions(counts) -> Iterator[tuple[str, list[int]]]:
        for j, series in enumerate(schema.numeric):
            if series.name in wanted:
                yield series.name, counts.numeric[j, :-1].tolist()  # underflow, bins, overflow: NaN apart
        for j, series in enumerate(schema.categorical):
            if series.name in wanted:
                yield series.name, counts.categorical[j][0].tolist()

    for name, bins in distributions(reference.counts):
        for slot, n in enumerate(bins):
            reference_bins.add_metric([engine.route, name, str(slot)], n)
    for (model, ver), counts in latest.items():
        for name, bins in distributions(counts):
            for slot, n in enumerate(bins):
                window_bins.add_metric([engine.route, model, ver, name, str(slot)], n)


def drift_status(engine: DriftEngine) -> dict[str, object]:
    """The ``/status`` entry of a route's drift engine: reference, latest window per version, short history."""
    snapshot = engine.snapshot()
    return {
        "reference": engine.reference.describe() if engine.reference else {"capturing": engine.spec.capture},
        "window": engine.spec.window,
        "detect": engine.spec.detect,
        "alarm_level": engine.spec.alarm_level,
        "persistence": None
        if engine.spec.persistence is None
        else [engine.spec.persistence.m, engine.spec.persistence.n],
        "calls": engine.accepted,
        "queued": engine.queued,
        "dropped": dict(engine.dropped),
        "versions": {
            "tracked": len(engine.versions),
            "max": engine.spec.max_versions,
            "retired": engine.versions.retired,
            "retired_calls": engine.retired_calls,
        },
        "decode_errors": snapshot["decode_errors"],
        "latest": [_window(result) for result in snapshot["latest"].values()],
        "sliding": [_window(result) for result in snapshot["sliding"].values()],
        "sliding_windows": engine.spec.sliding,
        "history": [_summary(result) for result in snapshot["history"]],
        "ground_truth": _ground_truth(engine),
        "quality": quality_status(engine.quality, snapshot["decode_errors"], _realized(engine)),
    }


def _realized(engine: DriftEngine) -> dict[tuple[str, str], float]:
    if engine.ground_truth is None:
        return {}
    latest = engine.ground_truth.snapshot()["latest"]
    return {key: q.metrics["accuracy"] for key, q in latest.items() if "accuracy" in q.metrics}


def _ground_truth(engine: DriftEngine) -> dict[str, object] | None:
    if engine.ground_truth is None:
        return None
    truth = engine.ground_truth.snapshot()
    spec = engine.ground_truth.spec
    return {
        "output": spec.output,
        "task": spec.task,
        "window": spec.window,
        "pending": truth["pending"],
        "outcomes": truth["results"],
        "open_rows": {f"{m} v{v}": n for (m, v), n in truth["open_rows"].items()},
        "latest": [
            {
                "model": q.model,
                "version": q.version,
                "index": q.index,
                "rows": q.rows,
                "metrics": {k: json_number(v) for k, v in q.metrics.items()},
            }
            for q in truth["latest"].values()
        ],
    }


def _window(result: WindowResult) -> dict[str, object]:
    attribution = result.attribution
    return {
        **_summary(result),
        "multivariate": None
        if result.multivariate is None
        else {
            "reconstruction_error": json_number(result.multivariate.error),
            "reference": json_number(result.multivariate.reference),
            "upper": json_number(result.multivariate.upper),
            "drifted": result.multivariate.drifted,
        },
        "attribution": None
        if attribution is None
        else {
            "ndcg": json_number(attribution.ndcg),
            "drifted": attribution.drifted,
            "importance": {k: json_number(v) for k, v in attribution.importance.items()},
            "reference": {k: json_number(v) for k, v in attribution.reference.items()},
        },
        "series": [
            {
                "name": s.name,
                "kind": s.kind,
                "categorical": s.categorical,
                "method": s.method,
                "drifted": s.drifted,
                "nan": s.nan,
                "threshold": json_number(s.threshold),
                "p_value": json_number(s.p_value),
                "adjusted": json_number(s.adjusted),
                "scores": {m: json_number(v) for m, v in sorted(s.scores.items())},
            }
            for s in result.series
        ],
    }


def _summary(result: WindowResult) -> dict[str, object]:
    return {
        "model": result.model,
        "version": result.version,
        "index": result.index,
        "calls": result.calls,
        "rows": result.rows,
        "started": result.started,
        "ended": result.ended,
        "feature_drift_share": json_number(result.feature_drift_share),
        "drifted": [s.name for s in result.series if s.drifted],
        "persistent": sorted(result.persistent),
    }


def render_drift(status: Mapping) -> str:
    """``mlmirror drift``: the latest window of each route and version as a table, then the recent history."""
    lines: list[str] = []
    for route in status.get("routes", []):
        drift = route.get("drift")
        if not drift:
            continue
        reference = drift["reference"]
        where = (
            f"reference: {reference['rows']} rows from {reference['model']} v{reference['version']}"
            if "rows" in reference
            else f"reference: capturing the first {reference['capturing']} calls"
        )
        lines.append(f"route {route['name']} ({where}; window {drift['window']} calls; detect {drift['detect']})")
        for window in drift["latest"]:
            lines.append(
                f"  {window['model']} v{window['version']} window {window['index']}: {window['calls']} calls, "
                f"{window['rows']} rows, feature drift share {_fmt(window['feature_drift_share'])}"
            )
            methods = sorted({m for s in window["series"] for m in s["scores"]})
            header = ["SERIES", "KIND", *[m.upper() for m in methods], "DRIFT"]
            body = [
                [s["name"], s["kind"], *[_fmt(s["scores"].get(m)) for m in methods],
                 f"yes ({s['method']})" if s["drifted"] else "no"]
                for s in window["series"]
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
            for row in (header, *body):
                lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            multivariate = window.get("multivariate")
            if multivariate:
                lines.append(
                    f"    PCA reconstruction error {_fmt(multivariate['reconstruction_error'])} (reference "
                    f"{_fmt(multivariate['reference'])}, bound {_fmt(multivariate['upper'])})"
                    + (" DRIFTED" if multivariate["drifted"] else "")
                )
            attribution = window.get("attribution")
            if attribution:
                ranked = sorted(attribution["importance"].items(), key=lambda kv: -(kv[1] or 0.0))
                lines.append(
                    f"    attribution NDCG {_fmt(attribution['ndcg'])}{' DRIFTED' if attribution['drifted'] else ''}; "
                    "importance " + ", ".join(f"{k} {_fmt(v)}" for k, v in ranked)
                )
        if drift["history"]:
            shares = " ".join(_fmt(h["feature_drift_share"]) for h in drift["history"])
            lines.append(f"  history (feature drift share, oldest first): {shares}")
        if not drift["latest"]:
            lines.append("  no window closed yet")
        truth = drift.get("ground_truth")
        if truth:
            lines.append(
                f"  ground truth ({truth['task']}, output {truth['output']}): outcomes "
                + ", ".join(f"{k} {v}" for k, v in truth["outcomes"].items())
                + f"; {truth['pending']} predictions waiting"
            )
            for q in truth["latest"]:
                metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in q["metrics"].items())
                lines.append(f"    {q['model']} v{q['version']} window {q['index']} ({q['rows']} rows): {metrics}")
        lines += quality_lines(drift.get("quality"))
    return "\n".join(lines) if lines else "no drift monitoring configured"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"

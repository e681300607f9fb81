"""The drift alarms' Prometheus families: the window's family-wise decision and the persistent series (m of the last
n windows, ``drift.persistence``), from the same engine snapshots as the rest of the drift families."""

from __future__ import annotations

from collections.abc import Iterator

from mlmirror.observing.drift.scoring import EngineSnapshot
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["AlarmFamilies"]


class AlarmFamilies:
    """Filled engine by engine during one scrape (``add``), then yielded (``families``)."""

    def __init__(self) -> None:
        version = ["route", "model", "version"]
        self.window = GaugeMetricFamily(
            "mlmirror_drift_window_detected",
            "1 when some series drifted in the latest window: the window's decision, family-wise at drift.alarm_level.",
            labels=version,
        )
        self.persistent = GaugeMetricFamily(
            "mlmirror_drift_persistent",
            "1 when the series drifted in m of the last n windows (drift.persistence; without it, in the latest).",
            labels=[*version, "series", "kind"],
        )

    def add(self, route: str, snapshot: EngineSnapshot) -> None:
        for result in snapshot["latest"].values():
            key = [route, result.model, result.version]
            self.window.add_metric(key, 1 if result.drifted else 0)
            for series in result.series:
                self.persistent.add_metric(
                    [*key, series.name, series.kind], 1 if series.name in result.persistent else 0
                )

    def families(self) -> Iterator[Metric]:
        yield from (self.window, self.persistent)

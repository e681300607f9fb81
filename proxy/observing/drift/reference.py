"""A reference profile — bin edges, vocabularies and reference counts per series — and the counts of a window.

Numeric series get quantile edges from the reference rows (``kernels.quantile_edges``); categorical series a
vocabulary of the categories seen in the reference (at most ``MAX_CATEGORIES``; others share the last slot).
Counts are kernels' layout (underflow, bins, overflow, NaN for numeric; categories then "other" for categorical),
so windows and replicas merge by addition.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from mlmirror import kernels
from mlmirror.observing.drift.binding import LEGACY_INPUT
from mlmirror.observing.drift.schema import Rows, Schema, Series

__all__ = ["MAX_CATEGORIES", "REVISION", "Reference", "WindowCounts"]

MAX_CATEGORIES = 256
#: Profile file revision: 2 records a feature's input tensor as null when the profile names none (1: "input").
REVISION = 2


@dataclass
class WindowCounts:
    """Counts of one window (or of the reference): numeric [series, bins + 3], one array per categorical series."""

    numeric: np.ndarray
    categorical: list[np.ndarray]
    calls: int = 0
    rows: int = 0

    def numeric_distribution(self) -> np.ndarray:
        """Underflow, bins and overflow (NaN apart), float64."""
        return self.numeric[:, :-1].astype(np.float64)


@dataclass
class Reference:
    """What windows are compared with. ``model``/``version`` say which model produced it; ``created`` is Unix time."""

    schema: Schema
    edges: np.ndarray
    vocabularies: list[dict[object, int]]
    counts: WindowCounts
    model: str = ""
    version: str = ""
    created: float = field(default_factory=time.time)
    #: For a profile of an older revision whose features named the default input: that name, preferred when the
    #: model has it (its unnamed features bind to the model's only input otherwise; see ``binding``).
    preferred_input: str | None = None

    def __post_init__(self) -> None:
        self.guide = kernels.edge_guide(self.edges) if self.edges.shape[0] else None
        self.positions = kernels.slot_positions(self.edges) if self.edges.shape[0] else np.empty((0, 0))

    @property
    def bins(self) -> int:
        return self.edges.shape[1] - 1

    @classmethod
    def build(
        cls, schema: Schema, rows: Rows, bins: int, *, calls: int, model: str = "", version: str = ""
    ) -> Reference:
        numeric = rows.numeric
        edges = kernels.quantile_edges(numeric, bins) if numeric.shape[1] else np.empty((0, bins + 1))
        vocabularies = []
        for j in range(rows.categorical.shape[1]):
            values, frequency = np.unique(rows.categorical[:, j].astype(object), return_counts=True)  # all bytes
            kept = values[np.argsort(-frequency, kind="stable")][:MAX_CATEGORIES]
            vocabularies.append({value: i for i, value in enumerate(kept)})
        reference = cls(schema, edges, vocabularies, WindowCounts(np.zeros((0, 0), np.int64), []), model, version)
        reference.counts = reference.new_window()
        reference.add(reference.counts, rows)
        reference.counts.calls = calls
        return reference

    def new_window(self) -> WindowCounts:
        return WindowCounts(
            numeric=kernels.new_counts(self.edges.shape[0], self.bins),
            categorical=[np.zeros((1, len(v) + 1), dtype=np.int64) for v in self.vocabularies],
        )

    def add(self, window: WindowCounts, rows: Rows) -> None:
        """Count ``rows`` into ``window`` (a batch of calls' rows, in the schema's order)."""
        if rows.numeric.shape[1]:
            kernels.update_sorted_edges(window.numeric, rows.numeric, self.edges, self.guide)
        for j, vocabulary in enumerate(self.vocabularies):
            other = len(vocabulary)
            codes = np.fromiter((vocabulary.get(v, other) for v in rows.categorical[:, j]), np.int64)
            kernels.update_categorical(window.categorical[j], codes[:, None])
        window.rows += rows.numeric.shape[0]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "created": self.created,
            "calls": self.counts.calls,
            "rows": self.counts.rows,
            "bins": self.bins,
            "series": self.schema.names(),
        }

    # --- files ------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the profile as ``.npz``: arrays plus a JSON header (series, vocabularies, model, version, time)."""
        header = {
            "format": "mlmirror-profile-1",
            "revision": REVISION,
            **self.describe(),
            "series": [[s.name, s.kind, s.tensor, s.column, s.categorical, s.width] for s in self.schema.series],
            "vocabularies": [[_jsonable(k) for k in v] for v in self.vocabularies],
        }
        # Any: numpy's stub reads a ** argument as possibly its allow_pickle flag
        arrays: dict[str, Any] = {f"categorical_{j}": c for j, c in enumerate(self.counts.categorical)}
        with open(path, "wb") as out:
            np.savez(out, header=np.array(json.dumps(header)), edges=self.edges, numeric=self.counts.numeric, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a profile written by ``save``; raises ValueError saying what is wrong."""
        try:
            with open(path, "rb") as file, np.load(file, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if not isinstance(header, dict) or header.get("format") != "mlmirror-profile-1":
                    raise ValueError("not an mlmirror profile (no mlmirror-profile-1 header)")
                series = [Series(*entry[:5], *entry[5:6]) for entry in header["series"]]
                preferred = None
                if int(header.get("revision", 1)) < REVISION and any(_legacy_default(s) for s in series):
                    # Before revision 2 an unnamed input was recorded as "input": read it as unnamed, "input" first.
                    series = [replace(s, tensor=None) if _legacy_default(s) else s for s in series]
                    preferred = LEGACY_INPUT
                vocabularies = [{_category(k): i for i, k in enumerate(v)} for v in header["vocabularies"]]
                counts = WindowCounts(
                    numeric=data["numeric"].astype(np.int64),
                    categorical=[data[f"categorical_{j}"].astype(np.int64) for j in range(len(vocabularies))],
                    calls=int(header["calls"]),
                    rows=int(header["rows"]),
                )
                edges = data["edges"].astype(np.float64)
                model, version, created = str(header["model"]), str(header["version"]), float(header["created"])
        except Exception as exc:  # numpy, zipfile and json raise many kinds; all mean "not a usable profile"
            raise ValueError(f"{path}: cannot read the profile: {exc}") from None
        return cls(Schema(series), edges, vocabularies, counts, model, version, created, preferred)


def _legacy_default(series: Series) -> bool:
    return series.kind == "feature" and series.tensor == LEGACY_INPUT


def _jsonable(category: object) -> object:
    return {"b": category.decode("latin-1")} if isinstance(category, bytes) else category


def _category(value: object) -> object:
    return value["b"].encode("latin-1") if isinstance(value, dict) else value

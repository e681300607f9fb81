"""Data quality per series and window, from the counts the drift engine already keeps (see ``reference``).

For a window of n rows and one series (the reference's shares likewise, from its own counts):

- ``missing``: numeric: NaN count / n (the counts' NaN slot); categorical: empty values (``b""``, what a KServe
  BYTES tensor carries for an empty string or null) / n, counted by the engine per call (``blanks``);
- ``out_of_range`` (numeric): (underflow + overflow) / n: values below the reference's lowest or above its highest
  bin edge (its minimum and maximum finite values), infinities included;
- ``unseen_category`` (categorical): values outside the reference vocabulary / n (the counts' last slot, empty values
  apart when the vocabulary does not hold ``b""``). A reference of more than ``MAX_CATEGORIES`` categories folds the
  rarest into that slot too; its own ``unseen_category`` share then says how much.

A check is flagged (``detected``) when the window's share exceeds the reference's by more than the route's
``drift.data_quality`` threshold for that check (default 0.05 each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from mlmirror.observing.drift.reference import Reference, WindowCounts
from mlmirror.observing.drift.schema import Rows, Schema

__all__ = ["BLANK", "DataQualityResult", "blanks", "data_quality"]

#: The categorical value read as missing.
BLANK = b""


@dataclass(frozen=True, slots=True)
class DataQualityResult:
    """One check of one series in one window: shares (0-1) of the window's rows and of the reference's."""

    series: str
    kind: str
    check: str
    ratio: float
    reference: float
    detected: bool


def blanks(rows: Rows) -> np.ndarray:
    """Empty values per categorical series of one call's rows (int64 [categorical series])."""
    if not rows.categorical.size:
        return np.zeros(rows.categorical.shape[1], np.int64)
    return np.array([column.count(BLANK) for column in rows.categorical.T.tolist()], np.int64)


def _shares(reference: Reference, counts: WindowCounts, blank: np.ndarray | None) -> dict[tuple[int, str], float]:
    """Shares per (series index in the schema's order, check) of ``counts``; ``blank`` None: the reference's own."""
    n = counts.rows
    shares: dict[tuple[int, str], float] = {}
    numeric = counts.numeric
    for j in range(numeric.shape[0]):
        shares[j, "missing"] = numeric[j, -1] / n if n else 0.0
        shares[j, "out_of_range"] = (numeric[j, 0] + numeric[j, -2]) / n if n else 0.0
    first = numeric.shape[0]
    for j, vocabulary in enumerate(reference.vocabularies):
        slots = counts.categorical[j][0]
        code = vocabulary.get(BLANK)
        # The reference's own empty values are in its vocabulary (when it has 256 categories or fewer).
        reference_empty = int(slots[code]) if code is not None else 0
        empty = reference_empty if blank is None else int(blank[j])
        unseen = int(slots[-1]) - (empty if code is None and blank is not None else 0)
        shares[first + j, "missing"] = empty / n if n else 0.0
        shares[first + j, "unseen_category"] = unseen / n if n else 0.0
    return shares


def data_quality(
    schema: Schema,
    reference: Reference,
    counts: WindowCounts,
    blank: np.ndarray,
    thresholds: Mapping[str, float],
) -> tuple[DataQualityResult, ...]:
    """Every check of every series of a window (``counts``, with ``blank`` empty values per categorical series)."""
    window = _shares(reference, counts, blank)
    base = _shares(reference, reference.counts, None)
    series = (*schema.numeric, *schema.categorical)
    return tuple(
        DataQualityResult(
            series[j].name,
            series[j].kind,
            check,
            float(ratio),
            float(base[j, check]),
            bool(ratio - base[j, check] > thresholds[check]),
        )
        for (j, check), ratio in window.items()
    )

"""Figures for JSON answers (``/status``): what the observing side's reports put in place of a float."""

from __future__ import annotations

import math

__all__ = ["json_number"]


def json_number(value: float) -> float | None:
    """A figure for a JSON answer: rounded to 6 decimals; NaN (unknown) as null, since JSON has no NaN."""
    return None if math.isnan(value) else round(float(value), 6)

"""``mlmirror shadows``: a running proxy's shadows as a readable table (from its ``/status``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["render_shadows"]

_COLUMNS = ("ROUTE", "SHADOW", "%", "CALLS", "SAMPLES", "AGREE", "LOWER", "NOISE", "ERR S/P", "P99 S/P MS", "MAE",
            "DROPPED", "VERDICT")  # fmt: skip


def render_shadows(status: Mapping) -> str:
    """The table, then one line per shadow that is not promotable saying why."""
    rows: list[Sequence[str]] = []
    why: list[str] = []
    for route in status.get("routes", []):
        for shadow in route.get("shadows", []):
            w = shadow["window"]
            dropped = sum(shadow["dropped"].values())
            verdict = "control" if shadow["control"] else ("PROMOTABLE" if shadow["promotable"] else "not yet")
            rows.append(
                (
                    route["name"],
                    shadow["name"],
                    f"{shadow['percent']:g}",
                    str(w["calls"]),
                    str(w["samples"]),
                    _ratio(w["agreement"]),
                    _ratio(w["lower_bound"]),
                    _ratio(w["noise"]),
                    f"{_ratio(w['shadow_error_ratio'])}/{_ratio(w['production_error_ratio'])}",
                    f"{_ms(w['shadow_p99_seconds'])}/{_ms(w['production_p99_seconds'])}",
                    "-" if w["mae"] is None else f"{w['mae']:.3g}",
                    str(dropped),
                    verdict,
                )
            )
            if not shadow["promotable"] and not shadow["control"]:
                why.append(f"{route['name']}/{shadow['name']}: " + "; ".join(shadow["reasons"]))
    if not rows:
        return "no shadows configured"
    widths = [max(len(row[i]) for row in (_COLUMNS, *rows)) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (_COLUMNS, *rows)]  # fmt: skip
    return "\n".join([*lines, *(["", *why] if why else [])])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"

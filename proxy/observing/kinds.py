"""The registry of per-route parts: every kind of consumer a route's config can ask for, in the order a route's tap
feeds them (and its ``/status`` entry lists them). A new kind is one module declaring a ``PartKind``
(proxy/observing/parts.py) and one line here."""

from __future__ import annotations

from mlmirror.observing.capture.part import KIND as CAPTURE
from mlmirror.observing.drift.part import KIND as DRIFT
from mlmirror.observing.parts import PartKind
from mlmirror.observing.shadows.part import KIND as SHADOWS

__all__ = ["PART_KINDS"]

PART_KINDS: tuple[PartKind, ...] = (SHADOWS, DRIFT, CAPTURE)

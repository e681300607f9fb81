"""Persistent drift: a series drifted in at least ``m`` of the last ``n`` closed windows of its model version
(``drift.persistence``), so that one noisy window never pages anyone. Without the setting, m = n = 1: persistent
is drifted in the latest window.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from mlmirror.config.schema_observing import Persistence
from mlmirror.observing.drift.scoring import WindowResult

__all__ = ["PersistenceTracker"]


class PersistenceTracker:
    """The drifted series of the last ``n`` windows per (model, version); called by the engine's worker only."""

    def __init__(self, spec: Persistence | None) -> None:
        self.m = spec.m if spec is not None else 1
        self.n = spec.n if spec is not None else 1
        self._recent: dict[tuple[str, str], deque[frozenset[str]]] = {}

    def see(self, key: tuple[str, str], result: WindowResult) -> WindowResult:
        """``result`` with ``persistent`` set from it and the windows of ``key`` before it."""
        recent = self._recent.setdefault(key, deque(maxlen=self.n))
        recent.append(frozenset(s.name for s in result.series if s.drifted))
        persistent = frozenset(s.name for s in result.series if sum(s.name in drifted for drifted in recent) >= self.m)
        return dataclasses.replace(result, persistent=persistent)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop what is kept for a retired model version."""
        self._recent.pop(key, None)

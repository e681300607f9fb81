"""A bounded set of the model versions (and model names) a route tracks, most recently seen last.

Drift windows, their scores and their Prometheus series are kept per (model, version): the model named in the
request, the version in the answer. Both come from outside, so an upstream that puts a new version in every answer,
or clients naming any model on a catch-all route, would grow memory and series without end. ``RecentKeys`` keeps
the ``limit`` most recently seen; seeing one more retires the least recently seen, and the caller drops what it kept
for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["RecentKeys"]

K = TypeVar("K", bound=Hashable)


class RecentKeys(Generic[K]):
    """At most ``limit`` keys, least recently seen first. ``retired`` counts the keys pushed out."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.retired = 0
        self._keys: OrderedDict[K, None] = OrderedDict()

    def see(self, key: K) -> K | None:
        """Mark ``key`` the most recently seen; returns the key retired to make room for it, if one was."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return None
        self._keys[key] = None
        if len(self._keys) <= self.limit:
            return None
        oldest, _ = self._keys.popitem(last=False)
        self.retired += 1
        return oldest

    def discard(self, key: K) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

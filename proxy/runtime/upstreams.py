"""The upstreams of the live route tables: built from the config, kept across reloads while their settings are
unchanged (with their channel and circuit state), each watched by one health-check loop until it is released."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping

from mlmirror.config import Config
from mlmirror.metrics import Metrics
from mlmirror.serving.upstream import UpstreamTarget

__all__ = ["UpstreamPool"]


class UpstreamPool:
    """Upstream targets and their health loops. ``checked()`` runs after every health check (the proxy refreshes
    its serving status). ``max_message_size`` (bytes) is fixed for the process: listener and channels agree."""

    def __init__(self, metrics: Metrics, max_message_size: int, checked: Callable[[], Awaitable[None]]) -> None:
        self._metrics = metrics
        self._max_message_size = max_message_size
        self._checked = checked
        self._loops: dict[UpstreamTarget, asyncio.Task[None]] = {}

    def targets_for(self, config: Config, current: Mapping[str, UpstreamTarget]) -> dict[str, UpstreamTarget]:
        """Targets for ``config``: the unchanged ones of ``current``, new ones (not yet watched) for the rest."""
        targets = {}
        for name, spec in config.upstreams.items():
            existing = current.get(name)
            if existing is not None and existing.spec == spec:
                targets[name] = existing
            else:
                targets[name] = UpstreamTarget(spec, max_message_size=self._max_message_size, metrics=self._metrics)
        return targets

    def watch(self, targets: Iterable[UpstreamTarget]) -> None:
        """Start a health loop for each target not yet watched."""
        loop = asyncio.get_running_loop()
        for target in targets:
            if target not in self._loops:
                self._loops[target] = loop.create_task(self._health_loop(target))

    async def release(self, targets: Iterable[UpstreamTarget]) -> None:
        """Stop watching ``targets`` and close their channels."""
        for target in targets:
            task = self._loops.pop(target, None)
            if task is not None:
                task.cancel()
            await target.close()

    def loops(self) -> list[asyncio.Task[None]]:
        return list(self._loops.values())

    async def _health_loop(self, target: UpstreamTarget) -> None:
        while True:
            await target.check_health()
            await self._checked()
            await asyncio.sleep(target.spec.health_check.interval)

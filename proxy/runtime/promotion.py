"""Promoting a shadow in a running proxy: a table swap to the promoted configuration (see
proxy/observing/shadows/promotion.py for what changes), allowed when the shadow's verdict says promotable or when
forced. No call fails: calls in flight finish on the old table."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlmirror.config import Config, load_config
from mlmirror.errors import StartError
from mlmirror.observing.shadows.promotion import PromotionError, promoted_config

if TYPE_CHECKING:
    from mlmirror.runtime.proxy import Proxy

__all__ = ["add_promote_argument", "promote", "replayed_config"]

log = logging.getLogger(__name__)


async def promote(proxy: Proxy, route: str, shadow: str, *, force: bool = False) -> str:
    """Make ``shadow`` the primary of ``route`` in ``proxy``. Unless ``force``, only when its verdict says
    promotable (a worker holds no verdict: the hub checks it, then forces the promotion in every worker). Raises
    ``PromotionError``; returns what was done, in words."""
    table = proxy.table
    assert table is not None
    config = promoted_config(table.config, route, shadow)  # checks the names first
    runtime = next(r for r in table.routes if r.name == route)
    shadows = proxy.parts.get(route, "shadows")
    verdict = shadows.verdict(shadow) if shadows is not None else None
    if not force and (verdict is None or not verdict.promotable):
        reasons = "; ".join(verdict.reasons) if verdict is not None else "its verdict is kept by the hub"
        raise PromotionError(f"shadow {shadow!r} is not promotable: {reasons} (force=1 overrides)")
    old_primary = runtime.spec.primary
    await proxy.reload(config)
    new_primary = next(r for r in config.routes if r.name == route).primary
    forced = " [forced]" if verdict is None or not verdict.promotable else ""
    message = (
        f"route {route}: primary is now {new_primary} (was {old_primary}, now "
        f"{runtime.spec.promotion.demote_to}){forced}"
    )
    log.warning("%s; the config file still says otherwise: a reload from it reverts the promotion", message)
    return message


def replayed_config(config_path: str, promotions: Sequence[Sequence[str]] = ()) -> Config:
    """The config file's configuration with ``promotions`` ((route, shadow) pairs, in the order they were made)
    applied: what a child the supervisor starts again must serve, so that it serves what the others serve from its
    first call. Raises ``StartError`` when one no longer applies (the file changed since)."""
    config = load_config(config_path)
    for route, shadow in promotions:
        try:
            config = promoted_config(config, route, shadow)
        except PromotionError as exc:
            raise StartError(f"cannot apply the promotion of {shadow} on route {route} again: {exc}") from None
    return config


def add_promote_argument(parser: argparse.ArgumentParser) -> None:
    """``--promote ROUTE SHADOW``, repeated: the promotions a child replays on the config file (see above)."""
    parser.add_argument("--promote", nargs=2, action="append", default=[], metavar=("ROUTE", "SHADOW"),
                        help="a promotion made since the config file was read, applied again")  # fmt: skip

"""What the start-up log says about who can reach the ext_proc observer (``mode: observer``; docs/SECURITY.md).

Whoever can open an ext_proc stream can feed fabricated calls into drift, shadows and captures. So observer mode
listens on loopback by default (Envoy runs beside it); a networked Envoy needs a non-loopback ``listen`` and mTLS
(``tls`` with ``client_ca``), and without mTLS the log says, on every start, that anyone may stream.
"""

from __future__ import annotations

from mlmirror.config import Config
from mlmirror.config.addresses import is_loopback
from mlmirror.config.schema import OBSERVER_LISTEN

__all__ = ["observer_warnings"]


def observer_warnings(config: Config, listen: str) -> list[str]:
    """Warnings about the observer listening on ``listen`` (none in proxy mode, or behind mTLS)."""
    if config.mode != "observer":
        return []
    if config.listen == OBSERVER_LISTEN and listen == OBSERVER_LISTEN:
        return [
            f"observer mode listens on {OBSERVER_LISTEN} by default (it was 0.0.0.0:8500): Envoy must run on this "
            "host; for a networked Envoy set listen: 0.0.0.0:8500 with tls and client_ca (docs/SECURITY.md)"
        ]
    if not is_loopback(listen) and (config.tls is None or config.tls.client_ca is None):
        return [
            f"the ext_proc observer on {listen} accepts streams from anyone who can reach it (fabricated calls "
            "would feed drift, shadows and captures): set tls with client_ca so that only Envoy's client "
            "certificate gets in, or listen on loopback (docs/SECURITY.md)"
        ]
    return []

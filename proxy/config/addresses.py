"""What a listening address says about who can reach it: loopback (this host only) or the network."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(address: str) -> bool:
    """Whether a listener on ``address`` (``host:port``, ``[v6]:port`` or ``unix:path``) is reachable from this host
    only: a loopback IP, ``localhost`` or a Unix socket. ``0.0.0.0``, ``[::]``, an empty host and any other name or
    address are the network's."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

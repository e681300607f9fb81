"""What an address says: whether a listener on it is loopback only or the network's, and whether a shadow's
`transport: h2` can reach an upstream target (one host, not a gRPC name resolver's list)."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback", "split_address"]


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


def split_address(address: str) -> tuple[str, str, int] | None:
    """``(family, host or path, port)`` for a target this client can reach itself: ``host:port``, ``[v6]:port``,
    ``dns:///host:port``, ``ipv4:`` or ``ipv6:`` with one address, ``unix:path`` or ``unix:///path`` (family
    ``unix``, port 0). None for anything else: several addresses, a DNS authority, other schemes."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        return ("unix", path, 0) if path else None
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    if "," in address or "/" in address:
        return None
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "443" if not rest else ""
        if not bracket:
            return None
    elif address.count(":") <= 1:
        host, _, port = address.partition(":")
        port = port or "443"
    else:
        return None
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return ("inet", host, int(port))

"""Loopback ports for benchmarks and tests: a free one, and waiting for a server to listen."""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "wait_for_port"]


_GIVEN: set[int] = set()  # every port free_port() has returned in this process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago, and that this process was not given before.

    The kernel may hand the same free port to two binds in a row; two servers told the same port would then share it
    (Envoy listens with SO_REUSEPORT) and split each other's connections."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")

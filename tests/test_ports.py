"""Loopback ports for the tests and benchmarks (loadtest/ports.py)."""

import socket

from loadtest.ports import free_port


def test_free_port_never_gives_one_process_the_same_port_twice():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and each was free: a server can listen on it
        s.bind(("127.0.0.1", ports[-1]))
        s.listen()

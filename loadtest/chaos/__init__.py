"""Chaos under load: faults injected into a proxy serving traffic, and what the clients and /metrics saw.

``scenarios.SCENARIOS`` runs each fault (killed, slow or failing primary; hung or killed shadow; a raising drift
engine; reloads; SIGTERM) against real gRPC servers on 127.0.0.1; tests/test_chaos.py asserts the invariants on
small runs, ``python -m loadtest.chaos`` prints the figures of larger ones.
"""

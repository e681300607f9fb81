"""What the interop tests do through mlmirror, shared by the per-server test modules: a config with one route,
batches of rows like the models' training data, calls with request ids, and the drift scenario."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from tests.interop.harness import INFER, Mlmirror, infer_request, outputs_of, raw_call
from tests.interop.servers import Peer, wait_for

REQUEST_ID = "x-mlmirror-request-id"


def one_route(peer: Peer, extra: str = "", *, primary: str | None = None, fallback: str | None = None,
              shadow: bool = False) -> str:  # fmt: skip
    """A config with one route for the peer's model: primary (the session's v1 server unless given), optional
    fallback and v2 shadow, plus ``extra`` route keys (indented 4)."""
    upstreams = {"v1": primary or peer.primary.address, "v2": peer.shadow.address}
    if fallback:
        upstreams["backup"] = fallback
    lines = ["upstreams:"]
    for name, address in upstreams.items():
        lines += [f"  {name}:", f"    address: {address}",
                  "    health_check: {interval: 500ms, timeout: 2s}"]  # fmt: skip
    lines += ["routes:", f"  - name: {peer.kind}", f"    match: {{model: {peer.model}}}", "    primary: v1"]
    if fallback:
        lines.append("    fallback: [backup]")
    if shadow:
        lines.append("    shadows: [{upstream: v2, queue_size: 1000, max_inflight: 8, timeout: 10s}]")
    return "\n".join(lines) + "\n" + extra


def rows(seed: int, n: int, calls: int, shift: tuple[int, float] | None = None) -> list[np.ndarray]:
    """``calls`` batches of ``n`` standard normal rows of 4 features (the models' training distribution);
    ``shift=(column, amount)`` moves one feature."""
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(n, 4)).astype(np.float32) for _ in range(calls)]
    if shift is not None:
        for x in batches:
            x[:, shift[0]] += shift[1]
    return batches


def infer(peer: Peer, x: np.ndarray, *, raw: bool = True, request_id: str = "") -> bytes:
    return infer_request(peer.model, x, peer.input_name, raw=raw, request_id=request_id,
                         outputs=peer.request_outputs)  # fmt: skip


def send_all(mirror: Mlmirror, peer: Peer, batches: list[np.ndarray], prefix: str) -> list[bytes]:
    """Every batch through mlmirror, one call each, with request ids ``prefix-i`` in the metadata."""
    with mirror.channel() as channel:
        return [raw_call(channel, INFER, infer(peer, x), metadata=[(REQUEST_ID, f"{prefix}-{i}")])[0]
                for i, x in enumerate(batches)]  # fmt: skip


def offline_agreement(peer: Peer, batches: list[np.ndarray]) -> tuple[int, int]:
    """(rows on which v1 and v2 agree, rows): both versions asked directly, argmax of ``peer.output`` per row."""
    agree = n = 0
    with grpc.insecure_channel(peer.primary.address) as v1, grpc.insecure_channel(peer.shadow.address) as v2:
        for x in batches:
            p1 = outputs_of(raw_call(v1, INFER, infer(peer, x))[0])[1][peer.output]
            p2 = outputs_of(raw_call(v2, INFER, infer(peer, x))[0])[1][peer.output]
            agree += int((p1.argmax(axis=1) == p2.argmax(axis=1)).sum())
            n += x.shape[0]
    return agree, n


def shadow_window(mirror: Mlmirror, peer: Peer, calls: int) -> dict | None:
    """The v2 shadow's status once ``calls`` copies are compared (else None)."""
    status = mirror.shadow(peer.kind, "v2")
    return status if sum(status["comparisons"].values()) >= calls else None


def drift_config(peer: Peer, profile: Path, window: int) -> str:
    return one_route(
        peer,
        f"""\
    drift:
      profile: {profile}
      window: {window}
      outputs: []
      multivariate: off
""",
    )


def closed_windows(mirror: Mlmirror, route: str, count: int) -> list[dict] | None:
    drift = mirror.route(route)["drift"]
    history = drift["history"]
    return history if len(history) >= count else None


def check_drift(peer: Peer, mirror: Mlmirror) -> tuple[dict, dict]:
    """One window of training-like traffic, then one with feature 2 shifted by 1.5 sd: only the second is
    flagged, and only for that feature. Returns both windows' summaries from ``/status``."""
    calls = 50
    send_all(mirror, peer, rows(6, 20, calls), "same")
    same = wait_for(lambda: closed_windows(mirror, peer.kind, 1), 120, "the first window")[-1]
    send_all(mirror, peer, rows(7, 20, calls, shift=(2, 1.5)), "shifted")
    shifted = wait_for(lambda: closed_windows(mirror, peer.kind, 2), 120, "the second window")[-1]
    assert (same["calls"], same["rows"]) == (calls, calls * 20)
    assert (shifted["calls"], shifted["rows"]) == (calls, calls * 20)
    assert same["drifted"] == [], same
    assert len(shifted["drifted"]) == 1, shifted
    assert shifted["drifted"][0].endswith("[2]"), shifted
    return same, shifted

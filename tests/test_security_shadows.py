"""What leaves with a copy: shadows (real gRPC servers recording what they receive) never see credentials by
default, see a header allowed back, and production still gets every header; captures store no headers; a worker
hands the observing process only what some shadow carries."""

from __future__ import annotations

import logging

import grpc
from mlmirror.config import parse_config
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.shadows.headers import HandoffFilter, handoff_stripped

from tests.support import ECHO, EchoServer, through_proxy, wait_until

SECRETS = (
    ("authorization", "Bearer production-secret"),
    ("cookie", "session=cookie-secret"),
    ("x-api-key", "key-secret"),
)


def shadow_config(production: EchoServer, plain: EchoServer, trusted: EchoServer, capture: str) -> str:
    return f"""
    mirror_shed_lag: off
    method_types: {{{ECHO}Unary: unary_unary}}
    upstreams: {{production: {production.address}, plain: {plain.address}, trusted: {trusted.address}}}
    routes:
      - match: {{}}
        primary: production
        capture: {{path: {capture}}}
        shadows:
          - {{upstream: plain, strip_metadata: [X-Internal]}}
          - {{upstream: trusted, forward_metadata: [authorization]}}
    """


async def test_shadows_never_see_credentials_unless_allowed_and_production_gets_every_header(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with (
        EchoServer("production") as production,
        EchoServer("plain") as plain,
        EchoServer("trusted") as trusted,
        through_proxy(shadow_config(production, plain, trusted, str(tmp_path / "capture"))) as (proxy, channel),
    ):
        metadata = (*SECRETS, ("x-internal", "internal-only"), ("x-tenant", "acme"))
        answer = await channel.unary_unary(ECHO + "Unary")(b"hello", metadata=metadata, timeout=10)
        assert answer == b"production:hello"
        await wait_until(lambda: plain.received and trusted.received, what="both copies")

        sent = production.received[0].metadata
        for key, value in metadata:
            assert sent[key] == value  # production: every header, untouched
        seen = plain.received[0].metadata
        assert not {"authorization", "cookie", "x-api-key", "x-internal"} & set(seen)
        assert seen["x-tenant"] == "acme"
        assert seen["x-mlmirror-shadow"] == "plain"
        allowed = trusted.received[0].metadata
        assert allowed["authorization"] == "Bearer production-secret"  # allowed back by name
        assert not {"cookie", "x-api-key"} & set(allowed)
        assert allowed["x-internal"] == "internal-only"  # only plain strips it

        await proxy.stop(grace=0)  # flushes the capture
        captured = "".join(p.read_text() for p in (tmp_path / "capture").glob("*"))
        assert "hello" in captured or "aGVsbG8" in captured  # the call itself was captured
        for _, value in SECRETS:
            assert value not in captured  # headers are never stored
    assert "shadow plain of route default: copies go without authorization, cookie, x-api-key, x-internal" in (
        caplog.text
    )
    assert "production-secret" not in caplog.text


class Recorder:
    name = "handoff"

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def offer(self, record: CallRecord) -> None:
        self.records.append(record)


def record_with(metadata: tuple) -> CallRecord:
    return CallRecord(
        route="default", method=ECHO + "Unary", request=b"x", response=b"y", code=grpc.StatusCode.OK, served_by="p",
        role="primary", request_id="1", metadata=metadata, started=0.0, latency=0.0, upstream_latency=0.0,
    )  # fmt: skip


def test_the_hand_off_carries_only_what_some_shadow_of_the_route_carries():
    config = parse_config(f"""
upstreams: {{p: 127.0.0.1:1, a: 127.0.0.1:2, b: 127.0.0.1:3}}
routes:
  - match: {{}}
    primary: p
    shadows: [{{upstream: a}}, {{upstream: b, forward_metadata: [cookie], strip_metadata: [x-b]}}]
    capture: {{path: {"/tmp/unused-capture"}}}
""")
    (route,) = config.routes
    assert handoff_stripped(route) == {"authorization", "proxy-authorization", "x-api-key"}
    recorder = Recorder()
    handoff = HandoffFilter(recorder, route)
    clean = record_with((("x-tenant", "acme"), ("x-b", "1")))
    handoff.offer(clean)
    assert recorder.records[-1] is clean  # nothing to drop: the very record
    handoff.offer(record_with((("authorization", "secret"), ("cookie", "c"), ("x-tenant", "acme"))))
    assert recorder.records[-1].metadata == (("cookie", "c"), ("x-tenant", "acme"))
    lone = parse_config("upstreams: {p: 127.0.0.1:1}\nroutes: [{match: {}, primary: p, drift: {}}]").routes[0]
    assert handoff_stripped(lone) == {"authorization", "cookie", "proxy-authorization", "x-api-key"}

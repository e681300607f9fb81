"""Who can reach the listeners: the ext_proc observer of a default observer config is bound to loopback (a stranger
cannot connect from a non-loopback address) and, with mTLS on, refuses a stream without a client certificate;
Feedback over mTLS takes only the client certificates ``feedback.clients`` lists."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlmirror.config import parse_config
from mlmirror.config.addresses import is_loopback
from mlmirror.observing.exposure import observer_warnings
from mlmirror.protos import feedback_pb2
from mlmirror.runtime.proxy import Proxy

from tests.support import make_certificates, running_proxy

REPORT = "/mlmirror.v1.Feedback/ReportOutcome"
OBSERVER = """
mode: observer
admin: 127.0.0.1:0
upstreams: {production: 127.0.0.1:1}
routes: [{match: {}, primary: production, drift: {}}]
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; a server certificate for 127.0.0.1; client certificates ``envoy``, ``labeler`` and ``stranger``."""
    names = ("server", "envoy", "labeler", "stranger")
    return make_certificates(
        tmp_path_factory.mktemp("certs"), {name: f"/CN={name}/O=ml" for name in names},
        {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "labeler": "subjectAltName=URI:spiffe://cluster/ns/ml/sa/labeler"},
    )  # fmt: skip


def credentials(certs: Path, client: str | None) -> grpc.ChannelCredentials:
    pair = {}
    if client is not None:
        pair = {"private_key": (certs / f"{client}.key").read_bytes(),
                "certificate_chain": (certs / f"{client}.pem").read_bytes()}  # fmt: skip
    return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(), **pair)


def mtls(certs: Path) -> str:
    return (f"tls: {{cert: {certs / 'server.pem'}, key: {certs / 'server.key'}, "
            f"client_ca: {certs / 'ca.pem'}}}\n")  # fmt: skip


def this_hosts_network_address() -> str:
    """A non-loopback IPv4 address of this host (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 9))  # UDP: nothing is sent
        address = probe.getsockname()[0]
    assert not is_loopback(f"{address}:1"), address
    return address


async def stream_once(channel: grpc.aio.Channel) -> None:
    """Open an ext_proc stream and send one message, as Envoy does; raises AioRpcError when refused."""
    stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)
    call = stub.Process(timeout=5)
    await call.write(ext.ProcessingRequest(request_headers=ext.HttpHeaders()))
    await call.done_writing()
    async for _ in call:
        pass


async def test_a_default_observer_listens_on_loopback_only():
    config = parse_config(OBSERVER)
    assert config.listen == "127.0.0.1:8500"
    host = config.listen.rpartition(":")[0]
    proxy = Proxy(dataclasses.replace(config, listen=f"{host}:0"))  # the default host; any free port
    await proxy.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            await stream_once(channel)  # Envoy beside it gets in
        stranger = this_hosts_network_address()
        with socket.socket() as s:  # the bind check: nothing listens there on the network address
            s.settimeout(5)
            assert s.connect_ex((stranger, proxy.grpc_port)) != 0
        async with grpc.aio.insecure_channel(f"{stranger}:{proxy.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_once(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await proxy.stop(grace=0)
    assert observer_warnings(config, config.listen)[0].startswith("observer mode listens on 127.0.0.1:8500 by default")


@pytest.mark.process  # the certificates come from openssl
async def test_an_observer_behind_mtls_refuses_a_stream_without_a_client_certificate(certs: Path):
    config = "listen: 0.0.0.0:0\n" + mtls(certs) + OBSERVER
    assert observer_warnings(parse_config(config), "0.0.0.0:0") == []
    async with running_proxy(config) as proxy:
        target = f"127.0.0.1:{proxy.grpc_port}"
        async with grpc.aio.secure_channel(target, credentials(certs, None)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_once(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, credentials(certs, "envoy")) as channel:
            await stream_once(channel)  # Envoy, with its certificate, gets in
    networked = parse_config("listen: 0.0.0.0:8500\n" + OBSERVER)
    assert "accepts streams from anyone" in observer_warnings(networked, networked.listen)[0]


@pytest.mark.process  # the certificates come from openssl
async def test_feedback_over_mtls_takes_only_the_listed_client_certificates(certs: Path):
    config = f"""
listen: 0.0.0.0:0
{mtls(certs)}
feedback: {{clients: ["spiffe://cluster/ns/ml/sa/labeler", "CN=envoy,O=ml"]}}
upstreams: {{production: 127.0.0.1:1}}
routes: [{{match: {{}}, primary: production}}]
"""
    request = feedback_pb2.ReportOutcomeRequest(outcomes=[feedback_pb2.Outcome(request_id="x", labels=["0"])])
    async with running_proxy(config) as proxy:
        target = f"127.0.0.1:{proxy.grpc_port}"
        for client in ("labeler", "envoy"):  # by SAN, by subject
            async with grpc.aio.secure_channel(target, credentials(certs, client)) as channel:
                answer = await channel.unary_unary(REPORT)(request.SerializeToString(), timeout=10)
                assert feedback_pb2.ReportOutcomeResponse.FromString(answer).unknown == 1
        async with grpc.aio.secure_channel(target, credentials(certs, "stranger")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(REPORT)(request.SerializeToString(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # the stranger may still call the health service: only Feedback is guarded
            health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs package declares no methods
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status >= 0
        assert proxy._entrances.rejected.labels("certificate")._value.get() == 1
        assert proxy.feedback.unknown == 2

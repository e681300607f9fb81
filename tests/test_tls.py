"""TLS to upstreams and on the listener (with client certificates), using certificates made by openssl here."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support import ECHO, EchoServer, _EchoHandler, make_certificates, running_proxy

pytestmark = pytest.mark.process  # starts openssl


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    return make_certificates(tmp_path_factory.mktemp("certs"), {"server": "/CN=server", "client": "/CN=client"},
                             {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost"})  # fmt: skip


async def _tls_echo(certs: Path, *, client_certs: bool = False) -> EchoServer:
    """An echo server on TLS; with ``client_certs``, it also requires a client certificate signed by the CA."""
    echo = EchoServer("tls")
    echo.server = grpc.aio.server()
    echo.server.add_generic_rpc_handlers((_EchoHandler(echo),))
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes() if client_certs else None,
        require_client_auth=client_certs,
    )
    echo.port = echo.server.add_secure_port("127.0.0.1:0", credentials)
    await echo.server.start()
    return echo


def _config(address: str, tls: str = "", listener_tls: str = "") -> str:
    return f"""
{listener_tls}
method_types: {{{ECHO}Unary: unary_unary}}
upstreams:
  up: {{address: {address}{tls}}}
routes:
  - {{match: {{}}, primary: up}}
"""


async def test_tls_to_an_upstream(certs: Path):
    async with await _tls_echo(certs) as echo:
        secure = _config(echo.address, f", tls: {{ca: {certs / 'ca.pem'}}}")
        async with running_proxy(secure) as proxy, grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            assert await channel.unary_unary(ECHO + "Unary")(b"hi") == b"tls:hi"
        # Without TLS the same upstream cannot be spoken to: TLS really was in use.
        async with (
            running_proxy(_config(echo.address)) as proxy,
            grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await channel.unary_unary(ECHO + "Unary")(b"hi", timeout=10)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_to_an_upstream(certs: Path):
    async with await _tls_echo(certs, client_certs=True) as echo:
        ca = f"ca: {certs / 'ca.pem'}"
        mutual = _config(echo.address, f", tls: {{{ca}, cert: {certs / 'client.pem'}, key: {certs / 'client.key'}}}")
        async with running_proxy(mutual) as proxy, grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            assert await channel.unary_unary(ECHO + "Unary")(b"hi") == b"tls:hi"
        # Without the client certificate the upstream refuses the connection.
        async with (
            running_proxy(_config(echo.address, f", tls: {{{ca}}}")) as proxy,
            grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await channel.unary_unary(ECHO + "Unary")(b"hi", timeout=10)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_on_the_listener(certs: Path):
    listener = f"tls: {{cert: {certs / 'server.pem'}, key: {certs / 'server.key'}, client_ca: {certs / 'ca.pem'}}}"
    async with EchoServer("plain") as echo, running_proxy(_config(echo.address, listener_tls=listener)) as proxy:
        target = f"127.0.0.1:{proxy.grpc_port}"
        ca = (certs / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await channel.unary_unary(ECHO + "Unary")(b"hi") == b"plain:hi"
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as no_cert:
                await channel.unary_unary(ECHO + "Unary")(b"hi", timeout=10)
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await channel.unary_unary(ECHO + "Unary")(b"hi", timeout=10)
    assert no_cert.value.code() is grpc.StatusCode.UNAVAILABLE
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE

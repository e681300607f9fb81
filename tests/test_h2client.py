"""mlmirror's own HTTP/2 client for shadow copies (transport h2) against real grpc.aio servers on 127.0.0.1: the same
answers and codes as grpc.aio gets, flow control on large messages, the server's stream limit, deadlines,
cancellation, unreachable and restarted servers, GOAWAY, TLS with ALPN, Unix sockets and keepalive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from mlmirror.config import Keepalive, TlsClient
from mlmirror.observing.shadows.h2client import H2Channel

from loadtest.ports import free_port
from tests.support import ECHO, EchoServer, _EchoHandler, make_certificates, wait_until

UNARY = ECHO + "Unary"
OK = grpc.StatusCode.OK


def _channel(address: str, *, tls: TlsClient | None = None, max_message_size: int = 4 << 20,
             keepalive: Keepalive | None = None) -> H2Channel:  # fmt: skip
    return H2Channel(address, tls=tls, max_message_size=max_message_size, keepalive=keepalive or Keepalive(),
                     user_agent="mlmirror/test")  # fmt: skip


async def test_answers_are_the_bytes_grpc_aio_gets_on_one_connection():
    async with EchoServer("e") as echo, grpc.aio.insecure_channel(echo.address) as reference:
        channel = _channel(echo.address)
        requests = [b"x" * n + bytes([n % 256]) for n in range(200)]
        got = await asyncio.gather(*(channel.unary(UNARY, r, (), 5.0) for r in requests))
        expected = [await reference.unary_unary(UNARY)(r) for r in requests]
        channel.close()
    assert got == [(e, OK) for e in expected]
    assert channel.connects == 1


async def test_metadata_reaches_the_server_and_the_client_s_own_headers_are_its_own():
    metadata = (("x-request-id", "abc-1"), ("x-data-bin", b"\x00\x01\xff"), ("user-agent", "client/9"),
                ("te", "gzip"), (":authority", "elsewhere"), ("grpc-timeout", "1n"))  # fmt: skip
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        assert await channel.unary(UNARY, b"hi", metadata, 7.0) == (b"e:hi", OK)
        channel.close()
    seen = echo.received[0].metadata
    assert seen["x-request-id"] == "abc-1"
    assert seen["x-data-bin"] == b"\x00\x01\xff"
    assert seen["user-agent"].startswith("mlmirror/test")
    assert echo.received[0].requests == [b"hi"]
    remaining = echo.received[0].time_remaining
    assert remaining is not None
    assert 0 < remaining <= 7.0  # grpc-timeout was the call's, not the metadata's


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ],
)
async def test_a_server_s_error_code_comes_through(code: grpc.StatusCode):
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        answer = await channel.unary(UNARY, b"hi", (("x-test-code", code.name),), 5.0)
        after = await channel.unary(UNARY, b"again", (), 5.0)
        channel.close()
    assert answer == (None, code)
    assert after == (b"e:again", OK)


async def test_an_unknown_method_is_unimplemented():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        assert await channel.unary("/nowhere.Service/Method", b"hi", (), 5.0) == (None, grpc.StatusCode.UNIMPLEMENTED)
        channel.close()


async def test_a_slow_answer_ends_deadline_exceeded_and_the_connection_goes_on():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        late = await channel.unary(UNARY, b"slow", (("x-test-sleep", "5"),), 0.2)
        after = await channel.unary(UNARY, b"fast", (), 5.0)
        channel.close()
    assert late == (None, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert after == (b"e:fast", OK)
    assert channel.connects == 1


async def test_messages_beyond_the_initial_windows_go_both_ways():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        requests = [bytes([i]) * (3 << 20) for i in range(4)]  # 3 MiB each: 48 times HTTP/2's initial window
        got = await asyncio.gather(*(channel.unary(UNARY, r, (), 60.0) for r in requests))
        channel.close()
    assert got == [(b"e:" + r, OK) for r in requests]


async def test_an_answer_over_the_size_limit_is_resource_exhausted():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address, max_message_size=1000)
        big = await channel.unary(UNARY, b"x" * 2000, (), 5.0)
        small = await channel.unary(UNARY, b"y", (), 5.0)
        channel.close()
    assert big == (None, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert small == (b"e:y", OK)


async def test_the_server_s_stream_limit_is_kept():
    echo = EchoServer("e")
    echo.server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 2)])
    echo.server.add_generic_rpc_handlers((_EchoHandler(echo),))
    echo.port = echo.server.add_insecure_port("127.0.0.1:0")
    await echo.server.start()
    async with echo:
        channel = _channel(echo.address)
        await channel.unary(UNARY, b"first", (), 5.0)  # the server's SETTINGS have arrived
        got = await asyncio.gather(*(channel.unary(UNARY, b"%d" % i, (("x-test-sleep", "0.05"),), 30.0)
                                     for i in range(12)))  # fmt: skip
        channel.close()
    # beyond its limit a grpc server refuses streams (RST_STREAM REFUSED_STREAM: UNAVAILABLE)
    assert got == [(b"e:%d" % i, OK) for i in range(12)]


async def test_a_cancelled_call_raises_and_the_connection_goes_on():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        call = asyncio.ensure_future(channel.unary(UNARY, b"slow", (("x-test-sleep", "30"),), 60.0))
        await wait_until(lambda: echo.received, what="the slow call to arrive")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        after = await channel.unary(UNARY, b"fast", (), 5.0)
        channel.close()
    assert after == (b"e:fast", OK)


async def test_an_unreachable_server_is_unavailable_until_it_comes_up():
    port = free_port()
    channel = _channel(f"127.0.0.1:{port}")
    assert await channel.unary(UNARY, b"hi", (), 5.0) == (None, grpc.StatusCode.UNAVAILABLE)
    async with EchoServer("late") as echo:
        await echo.stop()
        await echo.start(port)
        answers: list[tuple[bytes | None, grpc.StatusCode]] = []

        async def answered() -> bool:
            answers.append(await channel.unary(UNARY, b"hi", (), 5.0))
            return answers[-1][1] is OK

        await _eventually(answered, "a call after the server came up")  # the backoff is at most 2 s
        channel.close()
    assert answers[-1] == (b"late:hi", OK)
    assert {code for _, code in answers[:-1]} <= {grpc.StatusCode.UNAVAILABLE}


async def test_a_server_that_closes_every_connection_at_once_is_backed_off():
    """A connection that closes before the server says anything counts as a failed connect: the next calls fail at
    once instead of connecting again, until the backoff has passed."""

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    async with server:
        channel = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        assert await channel.unary(UNARY, b"a", (), 5.0) == (None, grpc.StatusCode.UNAVAILABLE)
        assert await channel.unary(UNARY, b"b", (), 5.0) == (None, grpc.StatusCode.UNAVAILABLE)
        assert channel.connects == 1  # the second call did not connect

        async def connected_again() -> bool:
            await channel.unary(UNARY, b"c", (), 5.0)
            return channel.connects == 2

        await _eventually(connected_again, "a connect after the backoff")
        channel.close()


async def test_a_restarted_server_gets_a_new_connection_and_calls_in_flight_end():
    port = free_port()
    echo = await EchoServer("one").start(port)
    channel = _channel(echo.address)
    assert await channel.unary(UNARY, b"a", (), 5.0) == (b"one:a", OK)
    pending = asyncio.ensure_future(channel.unary(UNARY, b"b", (("x-test-sleep", "30"),), 60.0))
    await wait_until(lambda: len(echo.received) == 2, what="the second call to arrive")
    await echo.stop()
    answer, code = await pending
    assert answer is None
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    async with EchoServer("two") as again:
        await again.stop()
        await again.start(port)

        async def answered() -> bool:
            return await channel.unary(UNARY, b"c", (), 5.0) == (b"two:c", OK)

        await _eventually(answered, "a call to the restarted server")
        channel.close()
    assert channel.connects == 2


async def test_a_graceful_stop_lets_calls_in_flight_finish():
    async with EchoServer("e") as echo:
        channel = _channel(echo.address)
        pending = asyncio.ensure_future(channel.unary(UNARY, b"b", (("x-test-sleep", "0.5"),), 30.0))
        await wait_until(lambda: echo.received, what="the call to arrive")
        assert echo.server is not None
        stopping = asyncio.ensure_future(echo.server.stop(20.0))  # GOAWAY, then waits for calls in flight
        assert await pending == (b"e:b", OK)
        await stopping
        assert await channel.unary(UNARY, b"c", (), 5.0) == (None, grpc.StatusCode.UNAVAILABLE)
        channel.close()


async def test_unix_socket(tmp_path: Path):
    echo = EchoServer("unix")
    echo.server = grpc.aio.server()
    echo.server.add_generic_rpc_handlers((_EchoHandler(echo),))
    echo.server.add_insecure_port(f"unix:{tmp_path / 's.sock'}")
    await echo.server.start()
    async with echo:
        channel = _channel(f"unix://{tmp_path / 's.sock'}")
        assert await channel.unary(UNARY, b"hi", (), 5.0) == (b"unix:hi", OK)
        channel.close()


async def test_keepalive_closes_a_connection_that_stopped_answering():
    """A server that takes the connection and then answers nothing at all (not even HTTP/2 SETTINGS)."""
    taken: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        channel = _channel(f"127.0.0.1:{port}", keepalive=Keepalive(time=1.0, timeout=0.2))
        # far from its deadline, the call ends when the ping goes unanswered
        assert await channel.unary(UNARY, b"hi", (), 120.0) == (None, grpc.StatusCode.UNAVAILABLE)
        channel.close()
        for writer in taken:
            writer.close()


async def test_each_call_waits_for_a_connect_only_as_long_as_its_own_deadline():
    """TLS to a server that takes the connection and never answers the handshake: the connect shared by two calls
    hangs; the call with the shorter deadline ends at it, the other is still waiting."""

    taken: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        channel = _channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", tls=TlsClient())
        patient = asyncio.ensure_future(channel.unary(UNARY, b"a", (), 60.0))
        await asyncio.sleep(0)
        assert await channel.unary(UNARY, b"b", (), 0.2) == (None, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert not patient.done()
        channel.close()  # stops the connect under way: the patient call ends too
        assert await asyncio.wait_for(patient, 30) == (None, grpc.StatusCode.UNAVAILABLE)
        for writer in taken:
            writer.close()


@pytest.mark.process  # starts openssl
async def test_tls_with_the_upstream_s_ca_and_a_client_certificate(tmp_path: Path):
    certs = make_certificates(tmp_path, {"server": "/CN=server", "client": "/CN=client"},
                              {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost"})  # fmt: skip
    echo = EchoServer("tls")
    echo.server = grpc.aio.server()
    echo.server.add_generic_rpc_handlers((_EchoHandler(echo),))
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True,
    )  # fmt: skip
    echo.port = echo.server.add_secure_port("127.0.0.1:0", credentials)
    await echo.server.start()
    async with echo:
        mutual = TlsClient(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key"))
        channel = _channel(echo.address, tls=mutual)
        assert await channel.unary(UNARY, b"hi", (), 5.0) == (b"tls:hi", OK)
        channel.close()
        for refused in (TlsClient(ca=str(certs / "ca.pem")), TlsClient()):  # no client certificate; system roots
            other = _channel(echo.address, tls=refused)
            assert await other.unary(UNARY, b"hi", (), 5.0) == (None, grpc.StatusCode.UNAVAILABLE)
            other.close()
        plain = _channel(echo.address)  # HTTP/2 in clear text to a TLS port
        answer, code = await plain.unary(UNARY, b"hi", (), 5.0)
        plain.close()
    assert answer is None
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)


async def _eventually(attempt, what: str, within: float = 30.0) -> None:
    """Run ``attempt`` (async, True when done) every 0.1 s until it is done; fail after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while not await attempt():  # noqa: ASYNC110 (each attempt is a call, not a flag to wait on)
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"no {what} within {within:g}s") from None

"""The HTTP/2 bytes of transport h2 against the reference HPACK codec (``hpack``), and its client against a scripted
server for what a grpc server does not send on its own: trailers-only answers, HTTP errors, refused and reset
streams, CONTINUATION, padding, compressed messages, PINGs, GOAWAY and broken frames."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import grpc
import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlmirror.config import Keepalive
from mlmirror.config.addresses import split_address
from mlmirror.observing.shadows import h2wire as w
from mlmirror.observing.shadows.h2client import H2Channel
from mlmirror.observing.shadows.h2streams import Waiters
from mlmirror.protocol.status import status_of

OK = grpc.StatusCode.OK
_names = st.binary(min_size=1, max_size=300).map(lambda b: bytes(97 + x % 26 for x in b))
_values = st.binary(max_size=600)


@given(st.lists(st.tuples(_names, _values), max_size=8))
def test_literals_decode_to_what_was_written_and_leave_the_table_alone(fields):
    decoder = hpack.Decoder()
    block = b"".join(w.literal(name, value) for name, value in fields)
    assert list(decoder.decode(block, raw=True)) == fields
    assert not w.changes_table(block)


@given(st.lists(st.tuples(_names, _values, st.booleans()), min_size=1, max_size=8), st.booleans(), st.booleans())
def test_changes_table_says_what_the_reference_decoder_does(fields, huffman, resize):
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    if resize:
        encoder.header_table_size = 1024  # the first block starts with a table size update
    headers = [hpack.NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
    for _ in range(2):  # the second time, fields the first block indexed are sent as indexes
        block = encoder.encode(headers, huffman=huffman)
        before = list(decoder.header_table.dynamic_entries), decoder.header_table.maxsize
        decoded = list(decoder.decode(block, raw=True))
        after = list(decoder.header_table.dynamic_entries), decoder.header_table.maxsize
        assert decoded == [(n, v) for n, v, _ in fields]
        assert w.changes_table(block) == (before != after)


def test_a_truncated_block_is_an_error():
    block = w.literal(b"name", b"value")
    with pytest.raises(IndexError):
        w.changes_table(block[:-2])


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (2.0, b"2000m"),
        (0.0001, b"1m"),
        (0.0015, b"2m"),
        (99_999.9, b"99999900m"),
        (100_000.0, b"100000S"),
        (1e12, b"99999999S"),
    ],
)
def test_grpc_timeout(seconds: float, header: bytes):
    assert w.grpc_timeout(seconds) == header


def test_metadata_leaves_out_the_client_s_own_headers_and_encodes_binary_values():
    block = w.metadata_block([("x-a", "1"), ("x-b-bin", b"\xff\x00"), (":path", "/x"), ("te", "gzip"),
                              ("content-type", "text/plain"), ("user-agent", "u")])  # fmt: skip
    assert list(hpack.Decoder().decode(block, raw=True)) == [(b"x-a", b"1"), (b"x-b-bin", b"/wA")]


@pytest.mark.parametrize(
    ("address", "split"),
    [("127.0.0.1:5000", ("inet", "127.0.0.1", 5000)), ("[::1]:7", ("inet", "::1", 7)),
     ("dns:///models.internal:9000", ("inet", "models.internal", 9000)), ("models", ("inet", "models", 443)),
     ("ipv4:10.0.0.1:1", ("inet", "10.0.0.1", 1)), ("ipv6:[::1]:2", ("inet", "::1", 2)),
     ("unix:///run/m.sock", ("unix", "/run/m.sock", 0)), ("unix:m.sock", ("unix", "m.sock", 0)),
     ("ipv4:10.0.0.1:1,10.0.0.2:1", None), ("dns://8.8.8.8/models:1", None), ("xds:///models", None),
     ("unix-abstract:m", None), ("models:0", None), ("models:65536", None), ("::1:5", None), ("unix:", None)],
)  # fmt: skip
def test_split_address(address: str, split):
    assert split_address(address) == split


def test_codes_of_resets_and_http_statuses():
    assert w.reset_code(0x7) is grpc.StatusCode.UNAVAILABLE
    assert w.reset_code(0x8) is grpc.StatusCode.CANCELLED
    assert w.reset_code(0x2) is grpc.StatusCode.INTERNAL
    assert w.http_code(503) is grpc.StatusCode.UNAVAILABLE
    assert w.http_code(404) is grpc.StatusCode.UNIMPLEMENTED
    assert w.http_code(418) is grpc.StatusCode.UNKNOWN
    assert status_of(b"5") is grpc.StatusCode.NOT_FOUND
    assert status_of("5") is grpc.StatusCode.NOT_FOUND
    assert status_of(b"99") is grpc.StatusCode.UNKNOWN
    assert status_of(b"x") is grpc.StatusCode.UNKNOWN


# A scripted server: reads the client's frames and answers each new stream with ``script(stream_id, encoder)``.

Script = Callable[[int, hpack.Encoder], bytes]


def _headers(encoder: hpack.Encoder, fields: list[tuple[str, str]]) -> bytes:
    return encoder.encode(fields)


def _trailers(stream: int, encoder: hpack.Encoder, status: str = "0") -> bytes:
    return w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, stream, _headers(encoder, [("grpc-status", status)]))


def _ok_answer(stream: int, encoder: hpack.Encoder, message: bytes = b"answer") -> bytes:
    body = b"\x00" + struct.pack(">I", len(message)) + message
    head = _headers(encoder, [(":status", "200"), ("content-type", "application/grpc")])
    return (
        w.frame(w.HEADERS, w.END_HEADERS, stream, head) + w.frame(w.DATA, 0, stream, body) + _trailers(stream, encoder)
    )


async def _scripted(
    script: Script,
    calls: int = 1,
    *,
    preamble: bytes = b"",
    client: Callable[[H2Channel], Awaitable[list]] | None = None,
) -> tuple[list, list[bytes]]:
    """(the answers of ``calls`` sequential calls through transport h2, or of ``client``'s calls, every frame type
    the server received)."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        encoder = hpack.Encoder()
        await reader.readexactly(len(w.PREFACE))
        writer.write(w.frame(w.SETTINGS, 0, 0) + preamble)
        try:
            while True:
                head = await reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big")
                await reader.readexactly(length)
                received.append(bytes((kind, flags)))
                if kind == w.DATA and flags & w.END_STREAM:
                    writer.write(script(stream, encoder))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        channel = H2Channel(f"127.0.0.1:{port}", tls=None, max_message_size=1 << 20, keepalive=Keepalive(),
                            user_agent="mlmirror/test")  # fmt: skip
        if client is not None:
            answers = await client(channel)
        else:
            answers = [await channel.unary("/s.S/M", b"q", (), 5.0) for _ in range(calls)]
        channel.close()
    return answers, received


async def test_a_plain_answer_and_the_next_one_on_the_same_connection():
    answers, _ = await _scripted(_ok_answer, calls=3)
    assert answers == [(b"answer", OK)] * 3


async def test_trailers_only_error():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        fields = [(":status", "200"), ("grpc-status", "5"), ("grpc-message", "no such model")]
        return w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, stream, _headers(encoder, fields))

    assert (await _scripted(script))[0] == [(None, grpc.StatusCode.NOT_FOUND)]


async def test_an_http_error_without_grpc_status():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        return w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, stream, _headers(encoder, [(":status", "503")]))

    assert (await _scripted(script))[0] == [(None, grpc.StatusCode.UNAVAILABLE)]


async def test_an_answer_without_grpc_status_is_unknown_and_without_a_message_internal():
    def no_status(stream: int, encoder: hpack.Encoder) -> bytes:
        head = _headers(encoder, [(":status", "200")])
        return w.frame(w.HEADERS, w.END_HEADERS, stream, head) + w.frame(w.DATA, w.END_STREAM, stream, b"")

    def no_message(stream: int, encoder: hpack.Encoder) -> bytes:
        head = _headers(encoder, [(":status", "200")])
        return w.frame(w.HEADERS, w.END_HEADERS, stream, head) + _trailers(stream, encoder)

    assert (await _scripted(no_status))[0] == [(None, grpc.StatusCode.UNKNOWN)]
    assert (await _scripted(no_message))[0] == [(None, grpc.StatusCode.INTERNAL)]


async def test_a_compressed_message_is_internal():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        answer = _ok_answer(stream, encoder)
        at = answer.index(b"\x00\x00\x00\x00\x06answer")
        return answer[:at] + b"\x01" + answer[at + 1 :]

    assert (await _scripted(script))[0] == [(None, grpc.StatusCode.INTERNAL)]


async def test_continuation_padding_and_split_messages():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        block = _headers(encoder, [(":status", "200"), ("content-type", "application/grpc"), ("x-long", "v" * 40)])
        body = b"\x00" + struct.pack(">I", 6) + b"answer"
        padded = bytes((3,)) + body[:4] + b"\x00" * 3
        return (w.frame(w.HEADERS, 0, stream, block[:10]) + w.frame(w.CONTINUATION, 0, stream, block[10:20])
                + w.frame(w.CONTINUATION, w.END_HEADERS, stream, block[20:])
                + w.frame(w.DATA, w.PADDED, stream, padded) + w.frame(w.DATA, 0, stream, body[4:])
                + _trailers(stream, encoder))  # fmt: skip

    assert (await _scripted(script, calls=2))[0] == [(b"answer", OK)] * 2


async def test_a_reset_stream_and_a_refused_one():
    refusals = []

    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        if stream == 1:
            return w.frame(w.RST_STREAM, 0, stream, struct.pack(">I", 0x2))  # INTERNAL_ERROR
        if len(refusals) < 2:  # refused twice, then answered: sent again
            refusals.append(stream)
            return w.frame(w.RST_STREAM, 0, stream, struct.pack(">I", w.REFUSED_STREAM))
        return _ok_answer(stream, encoder)

    answers, _ = await _scripted(script, calls=2)
    assert answers == [(None, grpc.StatusCode.INTERNAL), (b"answer", OK)]
    assert refusals == [3, 5]


async def test_pings_and_settings_are_acknowledged():
    ping = w.frame(w.PING, 0, 0, b"12345678")
    answers, received = await _scripted(_ok_answer, preamble=ping)
    assert answers == [(b"answer", OK)]
    assert bytes((w.PING, w.ACK)) in received
    assert bytes((w.SETTINGS, w.ACK)) in received


async def test_goaway_ends_the_calls_the_server_did_not_take_and_the_next_call_reconnects():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        if stream == 1:
            return _ok_answer(stream, encoder)
        return w.frame(w.GOAWAY, 0, 0, struct.pack(">II", 1, 0))  # stream 3 was not taken

    answers, _ = await _scripted(script, calls=3)
    assert answers[0] == (b"answer", OK)
    assert answers[1] == (None, grpc.StatusCode.UNAVAILABLE)
    assert answers[2] == (b"answer", OK)  # a new connection: stream 1 again


async def test_a_broken_frame_is_internal_and_closes_the_connection():
    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        return w.frame(w.HEADERS, w.END_HEADERS, stream, b"\xff\xff\xff\xff\xff\xff")  # an index past the tables

    assert (await _scripted(script))[0] == [(None, grpc.StatusCode.INTERNAL)]


async def test_after_a_refusal_the_stream_limit_comes_back():
    """Stream 1 is refused (its retry, stream 3, answered); the server then answers only once it holds four streams
    open at once, which this client does again once its lowered limit has been restored."""
    held: list[int] = []

    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        if stream == 1:
            return w.frame(w.RST_STREAM, 0, stream, struct.pack(">I", w.REFUSED_STREAM))
        if stream == 3:
            return _ok_answer(stream, encoder)
        held.append(stream)
        if len(held) < 4:
            return b""
        answers = b"".join(_ok_answer(s, encoder) for s in held)
        held.clear()
        return answers

    async def client(channel: H2Channel) -> list:
        first = await channel.unary("/s.S/M", b"q", (), 10.0)
        together = await asyncio.gather(*(channel.unary("/s.S/M", b"q", (), 30.0) for _ in range(4)))
        return [first, *together]

    limit = w.frame(w.SETTINGS, 0, 0, struct.pack(">HI", 0x3, 8))  # MAX_CONCURRENT_STREAMS 8
    answers, _ = await _scripted(script, preamble=limit, client=client)
    assert answers == [(b"answer", OK)] * 5


async def test_a_woken_call_that_is_cancelled_passes_its_turn_on():
    waiters = Waiters()
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(waiters.wait(loop.time() + 60))
    second = asyncio.ensure_future(waiters.wait(loop.time() + 60))
    await asyncio.sleep(0)
    assert len(waiters) == 2
    waiters.wake_one()  # the first's turn ...
    first.cancel()  # ... but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 30) is True
    assert await waiters.wait(loop.time() + 0.01) is False  # nobody wakes it: its deadline ends it


async def test_calls_wait_while_the_transport_takes_no_writes():
    sent: list[int] = []

    def script(stream: int, encoder: hpack.Encoder) -> bytes:
        sent.append(stream)
        return _ok_answer(stream, encoder)

    async def client(channel: H2Channel) -> list:
        assert await channel.unary("/s.S/M", b"q", (), 10.0) == (b"answer", OK)
        connection = channel._connection  # the protocol object its transport pauses and resumes
        assert connection is not None
        connection.pause_writing()
        late = await channel.unary("/s.S/M", b"q", (), 0.2)  # never written: it ends at its deadline
        waiting = asyncio.ensure_future(channel.unary("/s.S/M", b"q", (), 30.0))
        await asyncio.sleep(0.1)
        assert sent == [1]
        connection.resume_writing()
        return [late, await waiting]

    answers, _ = await _scripted(script, client=client)
    assert answers == [(None, grpc.StatusCode.DEADLINE_EXCEEDED), (b"answer", OK)]

"""The bytes of unary gRPC over HTTP/2 that a shadow copy needs: frames, request header blocks, and what an answer's
status, reset or HTTP status means as a gRPC code.

Request header blocks use HPACK literals without indexing (RFC 7541, 6.2.2), never Huffman-coded, so encoding keeps
no state: a block can be built once per method and reused on any connection. Answers are decoded with ``hpack``
(the server may index and Huffman-code what it sends).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable

import grpc
from mlmirror.protocol.status import status_of

__all__ = [
    "DATA", "HEADERS", "RST_STREAM", "SETTINGS", "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION", "PUSH_PROMISE",
    "END_STREAM", "END_HEADERS", "ACK", "PADDED", "PRIORITY_FLAG", "PREFACE", "CANCEL", "REFUSED_STREAM",
    "answer", "changes_table", "frame", "frames", "unpadded", "literal", "request_block", "metadata_block",
    "grpc_timeout", "reset_code", "http_code", "message",
]  # fmt: skip

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
#: the client connection preface (RFC 9113, 3.4)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: RST_STREAM error codes: the server did not process the stream; the stream is cancelled
REFUSED_STREAM, CANCEL = 0x7, 0x8

#: metadata a copy never repeats as a header: HTTP/2 pseudo-headers and what this client writes itself
_OWN_HEADERS = frozenset(
    {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "user-agent", "host",
     "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)  # fmt: skip

#: RST_STREAM error codes as gRPC codes (gRPC's PROTOCOL-HTTP2.md); any other: INTERNAL
_RESETS = {
    0x7: grpc.StatusCode.UNAVAILABLE,  # REFUSED_STREAM: not processed, safe to retry
    0x8: grpc.StatusCode.CANCELLED,
    0xB: grpc.StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}
#: HTTP status of an answer without grpc-status as a gRPC code (gRPC's http-grpc-status-mapping.md); other: UNKNOWN
_HTTP = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}


def frames(buffer: bytearray, max_frame: int) -> tuple[list[tuple[int, int, int, bytes]], int]:
    """The whole frames at the start of ``buffer`` as (type, flags, stream id, payload), and the bytes they took.
    Raises ConnectionError on a frame longer than ``max_frame``."""
    found = []
    at, size = 0, len(buffer)
    while size - at >= 9:
        length = int.from_bytes(buffer[at : at + 3], "big")
        if length > max_frame:
            raise ConnectionError(f"a frame of {length} bytes, over {max_frame}")
        if size - at - 9 < length:
            break
        stream = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
        found.append((buffer[at + 3], buffer[at + 4], stream, bytes(buffer[at + 9 : at + 9 + length])))
        at += 9 + length
    return found, at


def unpadded(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (flag PADDED: a length byte first, that many bytes last)."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ValueError("padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: a 9-byte header (length, type, flags, stream id) and ``payload``."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541, 5.1), the prefix's other bits zero."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing, name and value as raw (not Huffman-coded) strings."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def _skip_integer(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    """(the HPACK integer at ``at``, where the next field starts)."""
    limit = (1 << prefix_bits) - 1
    value = block[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, at


def changes_table(block: bytes) -> bool:
    """Whether decoding the HPACK header ``block`` changes the decoder's dynamic table: it holds a field with
    incremental indexing or a table size update. A block that does not can be decoded once and remembered until
    one that does arrives. Raises IndexError on a truncated block."""
    at, size = 0, len(block)
    while at < size:
        first = block[at]
        if first & 0x80:  # indexed field
            _, at = _skip_integer(block, at, 7)
        elif (first & 0xE0) in (0x40, 0x60, 0x20):  # incremental indexing (01), a table size update (001)
            return True
        else:  # literal without indexing, never indexed: a name index or a name string, then a value string
            index, at = _skip_integer(block, at, 4)
            for _ in range(1 if index else 2):
                length, at = _skip_integer(block, at, 7)
                at += length
            if at > size:
                raise IndexError("a truncated header block")
    return False


def grpc_timeout(seconds: float) -> bytes:
    """The ``grpc-timeout`` value for ``seconds``: at most 8 digits, in milliseconds or, beyond that, seconds."""
    millis = max(1, math.ceil(seconds * 1000))
    return b"%dm" % millis if millis < 10**8 else b"%dS" % min(10**8 - 1, math.ceil(seconds))


def request_block(path: str, authority: str, scheme: str, timeout: float, user_agent: str) -> bytes:
    """The header fields every copy of ``path`` starts with."""
    return b"".join(
        (
            b"\x83",  # :method POST, static table index 3
            b"\x87" if scheme == "https" else b"\x86",  # :scheme, static index 7 or 6
            literal(b":path", path.encode()),
            literal(b":authority", authority.encode()),
            literal(b"content-type", b"application/grpc"),
            literal(b"te", b"trailers"),
            literal(b"grpc-timeout", grpc_timeout(timeout)),
            literal(b"user-agent", user_agent.encode()),
        )
    )


def metadata_block(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    """The client's metadata as header fields: ``-bin`` values base64 (unpadded), names this client writes itself
    left out."""
    fields = []
    for key, value in metadata:
        if key.startswith(":") or key in _OWN_HEADERS:
            continue
        if key.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            encoded = base64.b64encode(raw).rstrip(b"=")
        else:
            encoded = value.encode() if isinstance(value, str) else value
        fields.append(literal(key.encode(), encoded))
    return b"".join(fields)


def reset_code(error: int) -> grpc.StatusCode:
    """The gRPC code of a stream reset by the server with ``error``."""
    return _RESETS.get(error, grpc.StatusCode.INTERNAL)


def http_code(status: int) -> grpc.StatusCode:
    """The gRPC code of an answer with HTTP ``status`` and no ``grpc-status``."""
    return _HTTP.get(status, grpc.StatusCode.UNKNOWN)


def answer(
    headers: Iterable[tuple[bytes, bytes]], trailers: Iterable[tuple[bytes, bytes]], body: bytes | bytearray
) -> tuple[bytes | None, grpc.StatusCode]:
    """What a finished stream says: (the message, OK) or (None, the code of its grpc-status, else of its HTTP status;
    INTERNAL for an OK without exactly one uncompressed message)."""
    http = next((int(value) for name, value in headers if name == b":status"), 200)
    code = next((status_of(value) for name, value in trailers if name == b"grpc-status"), None)
    if code is None:
        return None, http_code(http) if http != 200 else grpc.StatusCode.UNKNOWN
    if code is not grpc.StatusCode.OK:
        return None, code
    found = message(body)
    return found, code if found is not None else grpc.StatusCode.INTERNAL


def message(body: bytes | bytearray) -> bytes | None:
    """The one uncompressed gRPC message ``body`` holds (a 5-byte prefix, then its bytes); None for anything else."""
    if len(body) < 5 or body[0] != 0:
        return None
    length = int.from_bytes(body[1:5], "big")
    return bytes(body[5:]) if len(body) == 5 + length else None

"""The little of an HTTP/1.1 client that reading Envoy's admin takes: a response's head, and its body as it
arrives, chunked (how Envoy streams ``/tap``), sized by ``content-length`` or to the end of the connection.

The chunked body is decoded from whole reads of the socket (``ChunkedDecoder``), not one await per chunk: Envoy
writes each trace of a batch as a chunk of its own, and a batch of 2000 read chunk by chunk took long enough for
Envoy to carry calls untapped meanwhile (proxy/observing/envoytap.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

__all__ = ["ChunkedDecoder", "body_chunks", "response_head", "whole_body"]

_READ = 1 << 20  # bytes asked of the socket at a time
_SIZE_LINE = 64  # bytes a chunk's size line may take (hex digits, extensions)


async def response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status code and the headers (lowercase names) of an HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class ChunkedDecoder:
    """Decodes a ``Transfer-Encoding: chunked`` body fed in pieces of any size. ``done`` once the last (empty)
    chunk and the blank line after it have come; a malformed size line raises ``ValueError``. Trailers are not
    expected (Envoy's admin sends none) and are refused."""

    __slots__ = ("_buffer", "_left", "done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = -1  # bytes of the current chunk still to come; -1: a size line is next; -2: the last CRLF
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The body bytes ``data`` completes (in order; possibly parts of chunks)."""
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        at = 0
        while not self.done:
            if self._left == -2:
                if len(buffer) - at < 2:
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise ValueError("trailers after a chunked body")
                at += 2
                self.done = True
            elif self._left == -1:  # a size line
                end = buffer.find(b"\r\n", at)
                if end < 0:
                    if len(buffer) - at > _SIZE_LINE:
                        raise ValueError("a chunk size line too long")
                    break
                text = bytes(buffer[at:end]).split(b";", 1)[0].strip()
                if not text or any(c not in b"0123456789abcdefABCDEF" for c in text):
                    raise ValueError(f"not a chunk size: {text[:20]!r}")
                self._left = int(text, 16)
                at = end + 2
                if self._left == 0:
                    self._left = -2  # the blank line that ends the body
            else:
                take = min(self._left, len(buffer) - at)
                if take:
                    out.append(bytes(buffer[at : at + take]))
                    at += take
                    self._left -= take
                if self._left:
                    break
                if len(buffer) - at < 2:
                    break  # the chunk's CRLF is not here yet
                if buffer[at : at + 2] != b"\r\n":
                    raise ValueError("a chunk not followed by CRLF")
                at += 2
                self._left = -1
        del buffer[:at]
        return out


async def body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, sized by ``content-length``, or to the end of the connection."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoder = ChunkedDecoder()
        while not decoder.done:
            data = await reader.read(_READ)
            if not data:
                raise EOFError("the response ended inside its body")
            for part in decoder.feed(data):
                yield part
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, _READ))
            if not data:
                raise EOFError("the response ended early")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(_READ):
            yield data


async def whole_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    """A (short) response's body, its first ``limit`` bytes."""
    body = bytearray()
    async for data in body_chunks(reader, headers):
        body += data
        if len(body) > limit:
            break
    return bytes(body[:limit])

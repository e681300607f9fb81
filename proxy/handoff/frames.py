"""The door's wire format: answered calls as compact binary records, many to a frame.

A frame is a 4-byte big-endian length, then one kind byte and the payload:

- ``H`` (hello): UTF-8 JSON object, a worker's facts (index, pid, ports);
- ``B`` (batch): a 4-byte little-endian record count, then the records back to back.

A record is a fixed 48-byte head (little-endian ``_HEAD``) followed by its variable parts in head order::

    u32 request length · u32 response length (0xFFFFFFFF: no response) · u32 metadata length
    u16 route · u16 method · u16 served_by · u16 request_id lengths · u8 status code · u8 role length
    u16 flags · f64 started (Unix seconds) · f64 latency (s) · f64 upstream latency (s)
    route · method · served_by · role · request_id (UTF-8) · metadata · request · response (bytes)

Metadata comes in one of two forms, told by bit 0 of the head's flags: when every value is text without a NUL
character (gRPC's ASCII metadata always is), keys and values joined by NUL, in one UTF-8 string (flag set); else
entries ``u8 kind (0 text, 1 bytes) · u16 key length · u32 value length · key · value``. Strings are
UTF-8 with ``surrogatepass``, so any Python ``str`` survives. The request and response bytes are copied once, into
the frame; nothing is pickled or marshalled per call.

``decode_batch`` never trusts its input: a truncated or garbled record raises ``FrameError`` carrying the records
decoded before it, so the receiver delivers those and counts the rest.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

from mlmirror.handoff.tap import CallRecord
from mlmirror.protocol.status import CODES, NUMBERS

__all__ = ["BATCH", "HELLO", "MAX_FRAME", "FrameError", "decode_batch", "decode_hello", "encode_batch", "encode_hello"]

MAX_FRAME = 256 * 2**20  # bytes; a larger length prefix means a broken stream
HELLO = b"H"
BATCH = b"B"
_NO_RESPONSE = 0xFFFFFFFF
_HEAD = struct.Struct("<IIIHHHHBBHddd")
_ENTRY = struct.Struct("<BHI")
_COUNT = struct.Struct("<I")
_JOINED = 1  # flags: metadata in the joined-text form
_NAMES_CACHED = 1024  # distinct route/method/upstream/role names kept encoded


class FrameError(ValueError):
    """A frame that cannot be read; ``records`` holds the ones decoded before the damage, ``lost`` how many the
    frame announced beyond them (at least 1)."""

    def __init__(self, message: str, records: list[CallRecord], lost: int) -> None:
        super().__init__(message)
        self.records = records
        self.lost = lost


def _frame(kind: bytes, payload: bytes | bytearray) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + kind + payload


def encode_hello(facts: dict) -> bytes:
    """A hello frame, length prefix included."""
    return _frame(HELLO, json.dumps(facts).encode())


def decode_hello(payload: bytes | memoryview) -> dict:
    """The facts of a hello payload (the bytes after the kind); FrameError unless it is a JSON object."""
    try:
        facts = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"unreadable hello ({exc})", [], 0) from None
    if not isinstance(facts, dict):
        raise FrameError("a hello that is not an object", [], 0)
    return facts


class _Names:
    """UTF-8 forms of the few strings every record repeats (route, method, upstream, role), encoded once."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, bytes] = {}

    def __call__(self, text: str) -> bytes:
        encoded = self._cache.get(text)
        if encoded is None:
            if len(self._cache) >= _NAMES_CACHED:
                self._cache.clear()
            encoded = self._cache[text] = text.encode("utf-8", "surrogatepass")
        return encoded


_names = _Names()


def _metadata(metadata) -> tuple[bytes, int]:
    """(encoded metadata, flags)."""
    if not metadata:
        return b"", _JOINED
    try:
        text = "\0".join([part for item in metadata for part in item])
    except TypeError:  # a binary value
        text = None
    if text is not None and text.count("\0") == 2 * len(metadata) - 1:
        return text.encode("utf-8", "surrogatepass"), _JOINED
    parts = []
    for key, value in metadata:
        key_bytes = _names(key)
        if isinstance(value, str):
            value_bytes, kind = value.encode("utf-8", "surrogatepass"), 0
        elif isinstance(value, bytes | bytearray | memoryview):
            value_bytes, kind = bytes(value), 1
        else:
            raise TypeError(f"metadata {key!r}: a {type(value).__name__} value")
        parts.append(_ENTRY.pack(kind, len(key_bytes), len(value_bytes)))
        parts.append(key_bytes)
        parts.append(value_bytes)
    return b"".join(parts), 0


def encode_batch(records: Iterable[CallRecord]) -> tuple[bytes, int, int]:
    """(one batch frame with its length prefix, records in it, records left out). A record that cannot be
    written (a name longer than 65,535 bytes, a value of the wrong type) is left out, never raised."""
    parts: list[bytes] = []
    append = parts.append
    names, pack, numbers = _names, _HEAD.pack, NUMBERS
    count = skipped = 0
    for record in records:
        try:
            route, method = names(record.route), names(record.method)
            served_by, role = names(record.served_by), names(record.role)
            request_id = record.request_id.encode("utf-8", "surrogatepass")
            metadata, flags = _metadata(record.metadata)
            request, response = record.request, record.response
            head = pack(
                len(request), _NO_RESPONSE if response is None else len(response), len(metadata), len(route),
                len(method), len(served_by), len(request_id), numbers[record.code], len(role), flags,
                record.started, record.latency, record.upstream_latency,
            )  # fmt: skip
        except (struct.error, AttributeError, KeyError, TypeError, ValueError):
            skipped += 1
            continue
        parts += (head, route, method, served_by, role, request_id, metadata, request)
        if response is not None:
            append(response)
        count += 1
    payload = b"".join(parts)
    return (len(payload) + 5).to_bytes(4, "big") + BATCH + _COUNT.pack(count) + payload, count, skipped


def decode_batch(payload: bytes | memoryview) -> list[CallRecord]:
    """The records of a batch payload (the bytes after the kind). Raises FrameError at the first damaged record,
    with the records before it."""
    data = bytes(payload)
    records: list[CallRecord] = []
    if len(data) < 4:
        raise FrameError("a batch without its count", records, 1)
    (count,) = _COUNT.unpack_from(data, 0)
    at, end = 4, len(data)
    head_size, unpack, names = _HEAD.size, _HEAD.unpack_from, _texts
    try:
        for _ in range(count):
            if at + head_size > end:
                raise ValueError("truncated record head")
            (request_len, response_len, metadata_len, route_len, method_len, served_len, id_len, code, role_len,
             flags, started, latency, upstream) = unpack(data, at)  # fmt: skip
            at += head_size
            status = CODES.get(code)
            if status is None:
                raise ValueError(f"unknown status code {code}")
            has_response = response_len != _NO_RESPONSE
            size = (route_len + method_len + served_len + role_len + id_len + metadata_len + request_len
                    + (response_len if has_response else 0))  # fmt: skip
            if at + size > end:
                raise ValueError("truncated record")
            route = names(data[at : (at := at + route_len)])
            method = names(data[at : (at := at + method_len)])
            served_by = names(data[at : (at := at + served_len)])
            role = names(data[at : (at := at + role_len)])
            request_id = data[at : (at := at + id_len)].decode("utf-8", "surrogatepass")
            metadata = _read_metadata(data[at : (at := at + metadata_len)], flags & _JOINED)
            request = data[at : (at := at + request_len)]
            response = data[at : (at := at + response_len)] if has_response else None
            record = CallRecord(
                route=route, method=method, request=request, response=response, code=status, served_by=served_by,
                role=role, request_id=request_id, metadata=metadata, started=started, latency=latency,
                upstream_latency=upstream,
            )  # fmt: skip
            records.append(record)
    except (ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"damaged record {len(records) + 1} of {count} ({exc})", records,
                         max(count - len(records), 1)) from None  # fmt: skip
    if at != end:
        raise FrameError(f"{end - at} bytes after the last of {count} records", records, 1)
    return records


class _Texts:
    """The strings of the few names every record repeats, decoded once (the inverse of ``_Names``)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[bytes, str] = {}

    def __call__(self, raw: bytes) -> str:
        text = self._cache.get(raw)
        if text is None:
            if len(self._cache) >= _NAMES_CACHED:
                self._cache.clear()
            text = self._cache[raw] = raw.decode("utf-8", "surrogatepass")
        return text


_texts = _Texts()


def _read_metadata(raw: bytes, joined: int) -> tuple[tuple[str, str | bytes], ...]:
    if joined:
        if not raw:
            return ()
        parts = raw.decode("utf-8", "surrogatepass").split("\0")
        if len(parts) % 2:
            raise ValueError("joined metadata with a key and no value")
        return tuple(zip(parts[::2], parts[1::2], strict=True))
    entries: list[tuple[str, str | bytes]] = []
    at, end = 0, len(raw)
    while at < end:
        if at + _ENTRY.size > end:
            raise ValueError("truncated metadata entry")
        kind, key_len, value_len = _ENTRY.unpack_from(raw, at)
        at += _ENTRY.size
        if kind > 1 or at + key_len + value_len > end:
            raise ValueError("damaged metadata entry")
        key = _texts(raw[at : (at := at + key_len)])
        value = raw[at : (at := at + value_len)]
        entries.append((key, value.decode("utf-8", "surrogatepass") if kind == 0 else value))
    return tuple(entries)

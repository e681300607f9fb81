"""Reading single fields out of serialized protobuf bytes without decoding the message.

The router needs the KServe model name (field 1 of ModelInferRequest, ModelReadyRequest and ModelMetadataRequest)
on the hot path. A full decode costs time proportional to the tensor payload; this scan only walks the top-level
field headers, skipping each length-delimited field in one step, so it costs a few microseconds whatever the
payload size. Like a protobuf parser, it takes the *last* occurrence of a singular field.
"""

from __future__ import annotations

__all__ = ["read_string_field", "encode_string_field"]

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


def read_string_field(message: bytes, number: int) -> str | None:
    """The value of top-level string field ``number`` in ``message``, or None when absent or the bytes are malformed.

    Never raises: malformed input (truncated varints, lengths past the end, group wire types, invalid UTF-8) gives
    None, and the message is forwarded untouched for the upstream to judge.
    """
    found: bytes | None = None
    position = 0
    end = len(message)
    try:
        while position < end:
            # Field header: a varint (field number << 3 | wire type). Single-byte headers are the common case.
            key = message[position]
            position += 1
            if key & 0x80:
                key, position = _varint(message, position - 1)
            wire_type = key & 7
            if wire_type == _WIRE_LEN:
                length = message[position]
                position += 1
                if length & 0x80:
                    length, position = _varint(message, position - 1)
                stop = position + length
                if stop > end:
                    return None
                if key >> 3 == number:
                    found = message[position:stop]
                position = stop
            elif wire_type == _WIRE_VARINT:
                while message[position] & 0x80:
                    position += 1
                position += 1
            elif wire_type == _WIRE_FIXED64:
                position += 8
            elif wire_type == _WIRE_FIXED32:
                position += 4
            else:
                return None
        if position != end or found is None:
            return None
        return found.decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``position``; returns (value, position after it). At most 10 bytes."""
    value = 0
    shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            raise IndexError("varint too long")


def encode_string_field(number: int, value: str) -> bytes:
    """Serialize one length-delimited field; empty strings encode to nothing, as proto3 does."""
    data = value.encode("utf-8")
    if not data:
        return b""
    return _encode_varint(number << 3 | _WIRE_LEN) + _encode_varint(len(data)) + data


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

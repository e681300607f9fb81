"""gRPC status codes by their number on the wire, and what a ``grpc-status`` value names."""

from __future__ import annotations

import grpc

__all__ = ["CODES", "NUMBERS", "status_of"]

#: the number a status code has on the wire -> the code
CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
#: the code -> its number on the wire
NUMBERS: dict[grpc.StatusCode, int] = {code: code.value[0] for code in grpc.StatusCode}


def status_of(value: bytes | str) -> grpc.StatusCode:
    """The code a ``grpc-status`` header value names; UNKNOWN for anything else (not a number, no such code)."""
    try:
        return CODES.get(int(value), grpc.StatusCode.UNKNOWN)
    except ValueError:
        return grpc.StatusCode.UNKNOWN

"""Request ids and the deterministic sampling of calls for shadows.

A call's id is the KServe ``ModelInferRequest.id`` when set, else the client's ``x-mlmirror-request-id`` metadata,
else one the proxy assigns (unique per process and run). Unless the client sent a non-empty
``x-mlmirror-request-id`` of its own (forwarded untouched), the proxy adds that header with the id to what it sends
upstream (the primary and every shadow), and it returns the id to the client in the trailers of observed routes.

Sampling is a pure function of the id: ``sampling_point(id)`` is the first 8 bytes of BLAKE2b(id), big-endian, scaled
to [0, 100); a shadow at ``percent`` takes the calls whose point is below it. So a call sampled for one shadow at
10 % is sampled for every shadow at 10 % or more, on every proxy replica.
"""

from __future__ import annotations

import hashlib
import itertools
import os

from mlmirror.protocol.names import MODEL_INFER, REQUEST_ID
from mlmirror.protocol.wire import read_string_field

__all__ = ["RequestIds", "sampled", "sampling_point"]

_SCALE = 100.0 / 2**64

Metadata = tuple[tuple[str, str | bytes], ...]


def sampling_point(request_id: str) -> float:
    """Where ``request_id`` falls in [0, 100)."""
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") * _SCALE


def sampled(request_id: str, percent: float) -> bool:
    """Whether a shadow taking ``percent`` % of calls takes this one."""
    if percent >= 100.0:
        return True
    return percent > 0.0 and sampling_point(request_id) < percent


class RequestIds:
    """Finds or assigns call ids. Assigned ids are ``<12 random hex digits>-<counter in hex>``."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex() + "-"
        self._counter = itertools.count(1)

    def identify(self, method: str, request: bytes, metadata: Metadata) -> tuple[str, Metadata]:
        """(id, metadata to send upstream: ``metadata`` with ``x-mlmirror-request-id`` added when absent)."""
        from_client = ""
        for key, value in metadata:
            if key == REQUEST_ID and isinstance(value, str):
                from_client = value
        request_id = read_string_field(request, 3) if method == MODEL_INFER else None
        if not request_id:
            request_id = from_client or f"{self._prefix}{next(self._counter):x}"
        if not from_client:  # absent or empty: send the id we use (dropping an empty header)
            metadata = (*(item for item in metadata if item[0] != REQUEST_ID), (REQUEST_ID, request_id))
        return request_id, metadata

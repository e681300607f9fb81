"""Redaction of named input tensors of a KServe ``ModelInferRequest``, for what leaves the production path.

Shadows and captures get the request with the named inputs' contents zeroed; the production call is never touched
(the handler forwards the client's bytes). Zeroing, rather than removing, keeps every tensor's declared shape and
datatype valid, so a shadow model still answers:

- raw contents: a numeric tensor's buffer becomes as many zero bytes; a BYTES tensor's becomes one empty element
  per declared element (``shape``'s product, 4 zero bytes each);
- typed contents: every number becomes 0 (``false`` for BOOL), every BYTES element ``b""``.

Anything that cannot be redacted with certainty — not a ModelInfer request, bytes that do not parse, raw contents
that do not pair with the inputs, a BYTES buffer too short for its shape — raises ``TensorError``: callers drop
the copy (fail closed) rather than send it unredacted. The cost is one parse and one serialization of the
message, paid off the critical path (the mirror's dispatch, the capture's writer thread), once per call.
"""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError
from mlmirror.protocol.codec import DATATYPES
from mlmirror.protocol.kserve import TensorError
from mlmirror.protocol.names import MODEL_INFER
from mlmirror.protos import inference_pb2

__all__ = ["RedactedRequest", "redact_request"]

_EMPTY_BYTES_ELEMENT = b"\x00\x00\x00\x00"


def redact_request(method: str, data: bytes, names: tuple[str, ...] | frozenset[str]) -> bytes:
    """``data`` (a serialized request of ``method``) with the contents of the inputs named in ``names`` zeroed.

    Returns ``data`` itself when no input is named. Raises ``TensorError`` (reason ``not_kserve``, ``malformed``,
    ``raw_count``, ``byte_length``, ``bad_shape`` or ``unknown_datatype``) when it cannot be redacted."""
    if method != MODEL_INFER:
        raise TensorError("not_kserve", f"{method} is not a KServe ModelInfer call; its bytes cannot be redacted")
    try:
        message = inference_pb2.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        raise TensorError("malformed", f"not a ModelInferRequest: {exc}") from None
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise TensorError("raw_count", f"{len(raw)} raw contents for {len(message.inputs)} inputs")
    changed = False
    for i, spec in enumerate(message.inputs):
        if spec.name not in names:
            continue
        changed = True
        if raw:
            raw[i] = _zero_raw(spec, raw[i])
        else:
            _zero_contents(spec)
    return message.SerializeToString() if changed else data


def _zero_raw(spec, buffer: bytes) -> bytes:
    if spec.datatype != "BYTES":
        return bytes(len(buffer))
    count = math.prod(spec.shape) if all(d >= 0 for d in spec.shape) else -1
    if count < 0 or count * 4 > len(buffer):  # a valid BYTES buffer holds at least 4 bytes per element
        raise TensorError("byte_length", f"input {spec.name!r}: {len(buffer)} raw bytes for shape {list(spec.shape)}")
    return _EMPTY_BYTES_ELEMENT * count


def _zero_contents(spec) -> None:
    kind = DATATYPES.get(spec.datatype)
    if kind is None:
        raise TensorError("unknown_datatype", f"input {spec.name!r}: datatype {spec.datatype!r}")
    # Clear every typed field, not only the datatype's: a sender may have filled another one.
    for field, values in spec.contents.ListFields():
        zero = b"" if field.name == "bytes_contents" else False if field.name == "bool_contents" else 0
        values[:] = [zero] * len(values)


class RedactedRequest:
    """One call's request as redacted for a route, computed at most once however many consumers ask for it."""

    __slots__ = ("_data", "_error", "_method", "_names", "_value")

    def __init__(self, method: str, data: bytes, names: tuple[str, ...]) -> None:
        self._method = method
        self._data = data
        self._names = names
        self._value: bytes | None = None
        self._error: TensorError | None = None

    def value(self) -> bytes:
        """The redacted bytes; raises ``TensorError`` when the request cannot be redacted."""
        if self._value is None and self._error is None:
            try:
                self._value = redact_request(self._method, self._data, self._names)
            except TensorError as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

"""Decoding KServe V2 tensors from serialized messages, defensively: bad input raises ``TensorError`` with a reason.

Used off the critical path (shadow comparison, drift). A declared shape is only ever compared with the data that
actually arrived — arrays are views over bytes already received or copies of contents protobuf already parsed — so
a huge declared shape costs nothing and allocates nothing.

A tensor's data comes from ``raw_*_contents[i]`` (the i-th tensor's little-endian bytes; BYTES elements each a
4-byte little-endian length then the bytes) when the message has raw contents, else from its typed ``contents``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from mlmirror.protocol.codec import DATATYPES
from mlmirror.protos import inference_pb2

__all__ = [
    "MAX_ELEMENTS",
    "MAX_RANK",
    "Tensor",
    "TensorError",
    "decode_bytes_elements",
    "request_inputs",
    "response_outputs",
]

#: Largest element count (and dimension) a tensor may declare; larger declarations are rejected as ``bad_shape``.
MAX_ELEMENTS = 2**31 - 1
#: Most dimensions a tensor may declare (numpy's own limit is 64).
MAX_RANK = 32


class TensorError(ValueError):
    """A message or tensor that cannot be decoded. ``reason`` is a short metric label, e.g. ``shape_mismatch``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Tensor:
    """A decoded tensor: ``values`` has ``shape`` (object dtype of ``bytes`` for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray


def response_outputs(data: bytes) -> tuple[str, list[Tensor]]:
    """(model_version, outputs) of a serialized ``ModelInferResponse``."""
    message = _parse(inference_pb2.ModelInferResponse, data)
    return message.model_version, _tensors(message.outputs, message.raw_output_contents)


def request_inputs(data: bytes) -> tuple[str, list[Tensor]]:
    """(model_name, inputs) of a serialized ``ModelInferRequest``."""
    message = _parse(inference_pb2.ModelInferRequest, data)
    return message.model_name, _tensors(message.inputs, message.raw_input_contents)


def _parse(kind: Any, data: bytes) -> Any:
    """``kind`` parsed from ``data``; malformed bytes raise ``TensorError("malformed")``."""
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise TensorError("malformed", f"not a {kind.__name__}: {exc}") from None


def _tensors(specs: Sequence, raw: Sequence[bytes]) -> list[Tensor]:
    if raw and len(raw) != len(specs):
        raise TensorError("raw_count", f"{len(raw)} raw contents for {len(specs)} tensors")
    return [_tensor(spec, raw[i] if raw else None) for i, spec in enumerate(specs)]


#: (datatype, shape) -> (numpy dtype, bytes of raw contents) of the fixed-size tensors seen with raw contents:
#: a call's tensors usually have the shapes of the calls before, whose checks then need not run again. Bounded.
_RAW_LAYOUTS: dict[tuple[str, tuple[int, ...]], tuple[np.dtype, int]] = {}
_MAX_LAYOUTS = 4096


def _tensor(spec, raw: bytes | None) -> Tensor:
    datatype = spec.datatype
    shape = tuple(spec.shape)
    if raw is not None:
        layout = _RAW_LAYOUTS.get((datatype, shape))
        if layout is not None and len(raw) == layout[1]:
            return Tensor(spec.name, datatype, shape, np.frombuffer(raw, dtype=layout[0]).reshape(shape))
    kind = DATATYPES.get(datatype)
    if kind is None:
        raise TensorError("unknown_datatype", f"tensor {spec.name!r}: datatype {datatype!r}")
    if len(shape) > MAX_RANK:
        raise TensorError("bad_shape", f"tensor {spec.name!r}: {len(shape)} dimensions (at most {MAX_RANK})")
    if shape and (min(shape) < 0 or max(shape) > MAX_ELEMENTS):
        raise TensorError("bad_shape", f"tensor {spec.name!r}: dimension out of [0, {MAX_ELEMENTS}] in {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise TensorError("bad_shape", f"tensor {spec.name!r}: shape {list(shape)} declares {count} elements")
    if not count and math.prod(d for d in shape if d) > MAX_ELEMENTS:  # numpy cannot shape even an empty array so
        raise TensorError("bad_shape", f"tensor {spec.name!r}: shape {list(shape)} is too large even though empty")
    if raw is not None:
        if datatype == "BYTES":
            values = decode_bytes_elements(raw, count, spec.name)
        else:
            expected = count * kind.dtype.itemsize
            if len(raw) != expected:
                raise TensorError(
                    "byte_length",
                    f"tensor {spec.name!r}: {len(raw)} bytes, shape {list(shape)} of {datatype} needs {expected}",
                )
            values = np.frombuffer(raw, dtype=kind.dtype)
            if len(_RAW_LAYOUTS) >= _MAX_LAYOUTS:
                _RAW_LAYOUTS.clear()
            _RAW_LAYOUTS[datatype, shape] = (kind.dtype, expected)
    else:
        if kind.contents_field is None:
            raise TensorError("no_contents", f"tensor {spec.name!r}: {datatype} travels only as raw contents")
        contents = getattr(spec.contents, kind.contents_field)
        if len(contents) != count:
            raise TensorError(
                "element_count", f"tensor {spec.name!r}: {len(contents)} values, shape {list(shape)} needs {count}"
            )
        if datatype == "BYTES":
            values = np.empty(count, dtype=object)
            values[:] = list(contents)
        else:
            try:
                values = np.asarray(list(contents), dtype=kind.dtype)
            except OverflowError:
                raise TensorError("out_of_range", f"tensor {spec.name!r}: a value does not fit {datatype}") from None
    return Tensor(spec.name, datatype, shape, values.reshape(shape))


def decode_bytes_elements(raw: bytes, count: int, name: str = "") -> np.ndarray:
    """The ``count`` elements of a raw BYTES tensor (each a 4-byte little-endian length, then that many bytes)."""
    if count * 4 > len(raw):
        raise TensorError("byte_length", f"tensor {name!r}: {len(raw)} raw bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    position = 0
    end = len(raw)
    for i in range(count):
        if position + 4 > end:
            raise TensorError("byte_length", f"tensor {name!r}: raw BYTES holds fewer than {count} elements")
        length = int.from_bytes(raw[position : position + 4], "little")
        position += 4
        if position + length > end:
            raise TensorError("byte_length", f"tensor {name!r}: element {i} runs past the end of its raw bytes")
        out[i] = raw[position : position + length]
        position += length
    if position != end:
        raise TensorError("byte_length", f"tensor {name!r}: {end - position} bytes left after {count} elements")
    return out

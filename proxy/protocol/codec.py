"""KServe V2 tensors <-> numpy: the datatype table and the encoders the proxy needs.

The hot path never decodes; this module is used where the proxy builds or reads a message off the critical path
(static default responses now; the mirror comparator and the drift engine later).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DATATYPES", "Datatype", "encode_bytes_elements", "to_numpy"]


@dataclass(frozen=True, slots=True)
class Datatype:
    """One KServe V2 datatype: its numpy dtype (little-endian) and the typed-contents field that carries it."""

    name: str
    dtype: np.dtype
    contents_field: str | None  # None: raw bytes only (FP16)


def _datatype(name: str, dtype: str, field: str | None) -> tuple[str, Datatype]:
    return name, Datatype(name, np.dtype(dtype), field)


DATATYPES: dict[str, Datatype] = dict(
    [
        _datatype("BOOL", "?", "bool_contents"),
        _datatype("UINT8", "<u1", "uint_contents"),
        _datatype("UINT16", "<u2", "uint_contents"),
        _datatype("UINT32", "<u4", "uint_contents"),
        _datatype("UINT64", "<u8", "uint64_contents"),
        _datatype("INT8", "<i1", "int_contents"),
        _datatype("INT16", "<i2", "int_contents"),
        _datatype("INT32", "<i4", "int_contents"),
        _datatype("INT64", "<i8", "int64_contents"),
        _datatype("FP16", "<f2", None),
        _datatype("FP32", "<f4", "fp32_contents"),
        _datatype("FP64", "<f8", "fp64_contents"),
        _datatype("BYTES", "O", "bytes_contents"),
    ]
)


def to_numpy(datatype: str, values: list) -> np.ndarray:
    """Convert a flat list of Python values to a 1-D array of ``datatype``; raises ValueError when they don't fit.

    BYTES values may be ``str`` (encoded as UTF-8) or ``bytes``; numeric values must be representable exactly in
    integer types (no silent wrap-around).
    """
    kind = DATATYPES[datatype]
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            if isinstance(value, str):
                out[i] = value.encode()
            elif isinstance(value, bytes):
                out[i] = value
            else:
                raise ValueError(f"BYTES elements must be strings, got {value!r}")
        return out
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise ValueError("BOOL elements must be true or false")
        return np.asarray(values, dtype=kind.dtype)
    if kind.dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{datatype} elements must be integers")
        info = np.iinfo(kind.dtype)
        if values and (min(values) < info.min or max(values) > info.max):
            raise ValueError(f"{datatype} elements must lie in [{info.min}, {info.max}]")
        return np.asarray(values, dtype=kind.dtype)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{datatype} elements must be numbers")
    return np.asarray(values, dtype=kind.dtype)


def encode_bytes_elements(elements: np.ndarray) -> bytes:
    """Raw encoding of a BYTES tensor: each element as a 4-byte little-endian length followed by its bytes."""
    parts = []
    for element in elements:
        parts.append(len(element).to_bytes(4, "little"))
        parts.append(element)
    return b"".join(parts)

"""Merged shadow copies: several KServe ``ModelInfer`` requests sent as one, and the answer cut back per call.

A shadow with ``batch: N`` (N > 1) sends up to N waiting copies as one ``ModelInferRequest`` whose input tensors
are the calls' tensors concatenated along the first dimension (rows); each output of the shadow's answer is cut
back into the calls' rows, in order, and compared with production's answer to that call. One request then carries
the gRPC cost (and the shadow model's per-request cost) of N copies. It is right only for a model that answers each
row on its own, as a batch-capable KServe or Triton model does; the shadow's own batch limit must be at least N
times a call's rows.

Copies merge when their requests agree on everything but the rows (``MergeKey``):

- model name and version, the requested outputs, the request's parameters;
- the inputs in the same order, each with the same name, datatype, parameters and dimensions after the first;
- every input of a call has the same first dimension (the call's rows), and its data is complete: raw contents of
  the right length for its shape, or typed contents of the right count (calls with raw BYTES inputs go alone);
- all raw or all typed contents;
- the same metadata, once per-call ids (``PER_CALL_METADATA``) are left out. A merged copy carries that shared
  metadata, without the per-call ids.

A request that cannot merge (not ``ModelInfer``, malformed, no inputs, a rank-0 input) is sent alone, unchanged. An
answer whose outputs do not have the merged rows first is a comparison error ``batch_split`` for every call in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from mlmirror.protocol.codec import DATATYPES
from mlmirror.protocol.kserve import Tensor, TensorError, response_outputs
from mlmirror.protocol.names import ENVOY_REQUEST_ID, REQUEST_ID, TRACE_METADATA
from mlmirror.protos import inference_pb2

__all__ = ["PER_CALL_METADATA", "MergeKey", "Mergeable", "mergeable", "merged_request", "shared_metadata", "split"]

#: Metadata that names one call, not a batch of them: left out of the merge key and of a merged copy.
PER_CALL_METADATA = frozenset({REQUEST_ID, ENVOY_REQUEST_ID, *TRACE_METADATA})

Metadata = tuple[tuple[str, str | bytes], ...]
#: What merged copies share: model, version, outputs, parameters, inputs (name, datatype, parameters, trailing
#: dimensions), raw or typed, and the shared metadata.
MergeKey = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Mergeable:
    """A copy's request that may merge with others under ``key``; ``rows`` is its first dimension."""

    key: MergeKey
    rows: int
    message: inference_pb2.ModelInferRequest


def shared_metadata(metadata: Metadata) -> Metadata:
    """``metadata`` without the per-call ids."""
    return tuple(item for item in metadata if item[0] not in PER_CALL_METADATA)


def _parameters(parameters) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((name, value.SerializeToString(deterministic=True)) for name, value in parameters.items()))


def _complete(tensor, raw: bytes | None) -> bool:
    """Whether ``tensor``'s data is exactly what its shape declares (so it cannot spoil a merged request)."""
    kind = DATATYPES.get(tensor.datatype)
    if kind is None:
        return False
    count = math.prod(tensor.shape)
    if raw is not None:
        return tensor.datatype != "BYTES" and len(raw) == count * kind.dtype.itemsize
    return kind.contents_field is not None and len(getattr(tensor.contents, kind.contents_field)) == count


def mergeable(request: bytes, metadata: Metadata) -> Mergeable | None:
    """``request`` (a serialized ``ModelInferRequest``) as a mergeable copy, or None when it must go alone."""
    try:
        message = inference_pb2.ModelInferRequest.FromString(request)
    except DecodeError:
        return None
    raw = message.raw_input_contents
    if not message.inputs or (raw and len(raw) != len(message.inputs)):
        return None
    rows = -1
    inputs = []
    for i, tensor in enumerate(message.inputs):
        shape = tuple(tensor.shape)
        if not shape or min(shape) < 0 or (rows >= 0 and shape[0] != rows):
            return None
        if not _complete(tensor, raw[i] if raw else None):
            return None
        rows = shape[0]
        inputs.append((tensor.name, tensor.datatype, shape[1:], _parameters(tensor.parameters)))
    key = (
        message.model_name,
        message.model_version,
        tuple(output.SerializeToString(deterministic=True) for output in message.outputs),
        _parameters(message.parameters),
        tuple(inputs),
        bool(raw),
        shared_metadata(metadata),
    )
    return Mergeable(key, rows, message)


def merged_request(copies: Sequence[Mergeable]) -> bytes:
    """One serialized ``ModelInferRequest`` carrying every copy's rows, in order (the copies share a key)."""
    first = copies[0].message
    rows = sum(copy.rows for copy in copies)
    merged = inference_pb2.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    for name, value in first.parameters.items():
        merged.parameters[name].CopyFrom(value)
    merged.outputs.extend(first.outputs)
    raw = bool(first.raw_input_contents)
    for i, tensor in enumerate(first.inputs):
        out = merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[rows, *tensor.shape[1:]])
        for name, value in tensor.parameters.items():
            out.parameters[name].CopyFrom(value)
        if not raw:
            for copy in copies:
                out.contents.MergeFrom(copy.message.inputs[i].contents)
    if raw:
        merged.raw_input_contents.extend(
            b"".join(copy.message.raw_input_contents[i] for copy in copies) for i in range(len(first.inputs))
        )
    return merged.SerializeToString()


def split(answer: bytes, rows: Sequence[int]) -> list[list[Tensor]]:
    """The outputs of a merged ``answer``, cut into each call's ``rows``; raises ``TensorError`` (``batch_split``
    when an output does not have the merged rows first, else the decoding's reason)."""
    outputs = response_outputs(answer)[1]
    total = sum(rows)
    for tensor in outputs:
        if not tensor.shape or tensor.shape[0] != total:
            raise TensorError(
                "batch_split", f"output {tensor.name!r}: shape {list(tensor.shape)}, a merged answer has {total} rows"
            )
    parts = []
    start = 0
    for n in rows:
        parts.append([Tensor(t.name, t.datatype, (n, *t.shape[1:]), t.values[start : start + n]) for t in outputs])
        start += n
    return parts

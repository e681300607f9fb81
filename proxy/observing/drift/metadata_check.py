"""Checking a reference profile against what the model says it takes (KServe ``ModelMetadata``), at start-up.

A profile built for other inputs would make every window a decode error, or compare the wrong columns; so the proxy
asks the route's primary for the model's metadata and refuses to start when a profile's feature names an input the
model does not have, a column beyond the input's width, or a category where the input is numeric (or the reverse).
When the model cannot be asked (not up yet, not KServe), it says so in the log and starts.
"""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf.message import DecodeError
from mlmirror.observing.drift.reference import Reference
from mlmirror.protocol.names import MODEL_METADATA
from mlmirror.protos import inference_pb2

__all__ = ["profile_mismatches", "model_inputs"]

log = logging.getLogger(__name__)


async def model_inputs(channel: grpc.aio.Channel, model: str, deadline: float = 2.0) -> dict[str, tuple[str, list]]:
    """{input name: (datatype, shape)} from ``ModelMetadata``; raises grpc.aio.AioRpcError or ValueError."""
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_METADATA)
    answer = await call(inference_pb2.ModelMetadataRequest(name=model).SerializeToString(), timeout=deadline)
    try:
        metadata = inference_pb2.ModelMetadataResponse.FromString(answer)
    except DecodeError as exc:
        raise ValueError(f"the model's metadata does not decode: {exc}") from None
    return {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in metadata.inputs}


def profile_mismatches(reference: Reference, inputs: dict[str, tuple[str, list]]) -> list[str]:
    """What in ``reference`` does not fit the model's ``inputs`` (empty: it fits)."""
    problems = []
    for series in reference.schema.series:
        if series.kind != "feature":
            continue
        found = inputs.get(series.tensor)
        if found is None:
            problems.append(f"{series.name}: the model has no input {series.tensor!r} (it has {sorted(inputs)})")
            continue
        datatype, shape = found
        if series.categorical != (datatype == "BYTES"):
            kind = "categorical" if series.categorical else "numeric"
            problems.append(f"{series.name}: {kind} in the profile, but input {series.tensor!r} is {datatype}")
        dims = [d for d in shape[1:] if d >= 0]
        if len(dims) == len(shape) - 1:  # every non-batch dimension is known
            width = math.prod(dims) if dims else 1
            if series.column is not None and series.column >= width:
                problems.append(f"{series.name}: column {series.column}, but input {series.tensor!r} has {width}")
    return problems

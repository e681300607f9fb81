"""Checking a reference profile against what the model says it takes (KServe ``ModelMetadata``), at start-up.

A profile built for other inputs would make every window a decode error, or compare the wrong columns; so the proxy
asks the route's primary for the model's metadata and refuses to start when a profile's feature names an input the
model does not have, a column beyond the input's width, or a category where the input is numeric (or the reverse).
A profile that names no input is bound here to the model's only input (several: it refuses to start, listing them).
When the model cannot be asked (not up yet, not KServe), it says so in the log and starts. When the model declares
no inputs at all (MLServer, when the model's settings list none), it has told nothing: the proxy warns and starts,
and the drift engine binds an unnamed input from the first call.
"""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf.message import DecodeError
from mlmirror.observing.drift.binding import choose_input
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.reference import Reference
from mlmirror.protocol.names import MODEL_METADATA
from mlmirror.protos import inference_pb2

__all__ = ["fit_profile", "model_inputs", "profile_mismatches"]

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


def fit_profile(engine: DriftEngine, inputs: dict[str, tuple[str, list]]) -> list[str]:
    """Bind ``engine``'s profile to the model's ``inputs`` where it names none, and say what does not fit (empty:
    it fits, or the model declared no inputs to check against; that is logged)."""
    reference = engine.reference
    assert reference is not None
    if not inputs:
        log.warning(
            "route %s: the model declares no inputs in its metadata; profile %s is not checked against them%s",
            engine.route, engine.spec.profile,
            ", and its unnamed input is bound from the first call" if reference.schema.unbound else "",
        )  # fmt: skip
        return []
    if reference.schema.unbound:
        try:
            engine.bind_input(choose_input(list(inputs), reference.preferred_input))
        except ValueError as exc:
            return [str(exc)]
    return profile_mismatches(reference, inputs)


def profile_mismatches(reference: Reference, inputs: dict[str, tuple[str, list]]) -> list[str]:
    """What in ``reference`` does not fit the model's ``inputs`` (empty: it fits)."""
    problems = []
    for series in reference.schema.series:
        if series.kind != "feature":
            continue
        found = inputs.get(series.tensor) if series.tensor is not None else None
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

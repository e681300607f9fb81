"""The static default ModelInfer answer a route gives when every upstream of its fallback chain failed."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError
from mlmirror.config import StaticResponse
from mlmirror.protocol.codec import DATATYPES, encode_bytes_elements, to_numpy
from mlmirror.protocol.wire import read_string_field
from mlmirror.protos import inference_pb2

__all__ = ["StaticResponder"]

_MAX_BATCH = 65536  # a request declaring a larger batch gets this many rows, never an unbounded allocation


class StaticResponder:
    """Renders a ``ModelInferResponse`` from configured output tensors.

    The response echoes the request's ``model_name`` and ``id``; outputs whose first dimension is -1 repeat their
    configured row once per row of the request's first input. Outputs travel as typed contents, or all as
    ``raw_output_contents`` when one of them is FP16 (which has no typed field).
    """

    def __init__(self, spec: StaticResponse) -> None:
        self.spec = spec
        self._rows = [to_numpy(t.datatype, list(t.values)) for t in spec.outputs]
        self._batched = any(t.shape[0] == -1 for t in spec.outputs)
        self._raw = any(DATATYPES[t.datatype].contents_field is None for t in spec.outputs)

    def render(self, request: bytes) -> bytes:
        """Serialized response to ``request`` (the client's ModelInferRequest bytes, possibly malformed)."""
        response = inference_pb2.ModelInferResponse(
            model_name=read_string_field(request, 1) or "",
            model_version=self.spec.model_version,
            id=read_string_field(request, 3) or "",
        )
        batch = _batch_size(request) if self._batched else 1
        for tensor, row in zip(self.spec.outputs, self._rows, strict=True):
            shape = [batch if d == -1 else d for d in tensor.shape]
            values = np.tile(row, batch) if tensor.shape[0] == -1 else row
            output = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            if self._raw:
                response.raw_output_contents.append(
                    encode_bytes_elements(values) if tensor.datatype == "BYTES" else values.tobytes()
                )
            else:
                field = DATATYPES[tensor.datatype].contents_field
                assert field is not None  # not raw: every output has a typed field
                getattr(output.contents, field).extend(values.tolist())
        return response.SerializeToString()


def _batch_size(request: bytes) -> int:
    """Rows in the request: the first dimension of its first input, clamped to [1, 65536]; 1 when unreadable."""
    try:
        message = inference_pb2.ModelInferRequest.FromString(request)
    except DecodeError:
        return 1
    if not message.inputs or not message.inputs[0].shape:
        return 1
    return int(min(max(message.inputs[0].shape[0], 1), _MAX_BATCH))

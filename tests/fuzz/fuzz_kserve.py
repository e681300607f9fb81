"""Atheris harness: the KServe V2 decoders and the comparator take any bytes and either decode or raise
``TensorError`` (never another exception).

    python tests/fuzz/fuzz_kserve.py -atheris_runs=200000

atheris is optional (``pip install atheris``); this file is not collected by pytest.
"""

from __future__ import annotations

import contextlib
import sys

import atheris
import grpc  # noqa: F401 - imported before instrumenting: only mlmirror's own code is instrumented
import numpy  # noqa: F401
from mlmirror.protos import inference_pb2

with atheris.instrument_imports():
    from mlmirror.config import Compare
    from mlmirror.observing.shadows.compare import Comparator, ProductionAnswer
    from mlmirror.protocol.kserve import TensorError, request_inputs, response_outputs
    from mlmirror.protocol.names import MODEL_INFER

COMPARATORS = [Comparator(Compare(classification=mode)) for mode in ("none", "argmax", "label")]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
             "BYTES", "FP8", ""]  # fmt: skip
DIMENSIONS = [0, 1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1]


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A ModelInferResponse built from the fuzzer's choices: odd datatypes, huge or zero dimensions, raw contents
    of any length (so that mutations reach the tensor checks, not only the protobuf parser)."""
    response = inference_pb2.ModelInferResponse(model_name="m", model_version=fdp.ConsumeUnicodeNoSurrogates(4))
    raw = fdp.ConsumeBool()
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        shape = [fdp.PickValueInList(DIMENSIONS) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        output = response.outputs.add(name=fdp.ConsumeUnicodeNoSurrogates(3), datatype=fdp.PickValueInList(DATATYPES),
                                      shape=shape)  # fmt: skip
        if raw:
            response.raw_output_contents.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        else:
            output.contents.fp32_contents.extend(fdp.ConsumeFloatList(fdp.ConsumeIntInRange(0, 8)))
    return response.SerializeToString()


def one_input(data: bytes) -> None:
    """Decode ``data`` (or a response built from it) as a request and a response; compare two answers."""
    fdp = atheris.FuzzedDataProvider(data)
    comparator = COMPARATORS[fdp.ConsumeIntInRange(0, 2)]
    if fdp.ConsumeBool():
        first, second = structured(fdp), structured(fdp)
    else:
        rest = fdp.ConsumeBytes(len(data))
        first, second = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    for decode in (request_inputs, response_outputs):
        with contextlib.suppress(TensorError):
            decode(first)
    comparator.compare(ProductionAnswer(MODEL_INFER, first), second)  # never raises: errors are reasons


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

"""Protocol definitions, compiled from the ``.proto`` files beside this module at import time.

grpcio-tools generates the Python message and stub modules in memory the first time this package is imported
(``grpc.protos_and_services``), so there is no generated code in the tree to drift from its source.

Exports:
    inference_pb2, inference_pb2_grpc: KServe V2 / Open Inference Protocol (package ``inference``).
    feedback_pb2, feedback_pb2_grpc: mlmirror's ground-truth feedback service (package ``mlmirror.v1``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

__all__ = [
    "feedback_pb2",
    "feedback_pb2_grpc",
    "inference_pb2",
    "inference_pb2_grpc",
]

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def _compile(proto_file: str) -> tuple[ModuleType, ModuleType]:
    """Compile ``protos/<proto_file>`` into (messages, services) modules with grpcio-tools.

    grpcio-tools resolves proto paths against ``sys.path``; in an editable install the folder that holds this
    package may not be on it, so it is appended for the duration of the compile only.
    """
    added = _PACKAGE_PARENT not in sys.path
    if added:
        sys.path.append(_PACKAGE_PARENT)
    try:
        return grpc.protos_and_services(f"protos/{proto_file}")
    finally:
        if added:
            sys.path.remove(_PACKAGE_PARENT)


# Any: the modules exist only once compiled, so a type checker knows none of their classes.
inference_pb2: Any
inference_pb2_grpc: Any
feedback_pb2: Any
feedback_pb2_grpc: Any
inference_pb2, inference_pb2_grpc = _compile("grpc_predict_v2.proto")
feedback_pb2, feedback_pb2_grpc = _compile("feedback.proto")

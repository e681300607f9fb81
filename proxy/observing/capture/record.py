"""The capture format: one answered call as one line of JSON, and the inputs of a capture read back as arrays.

A line holds (absent keys are ``include``'s choice; ``null`` is "not known"):

- ``time`` (Unix seconds the call arrived), ``route``, ``method``, ``request_id``, ``code`` (the gRPC status the
  client got, e.g. ``OK``), ``served_by`` (upstream, or ``static-default``), ``role`` (``primary``, ``fallback``),
  ``latency`` (seconds from arrival to answer), ``upstream_latency`` (seconds of the attempt that answered);
- KServe ModelInfer calls: ``model_name`` and ``model_version`` (from the response);
- ``request`` / ``response``: the message bytes in base64 (``response`` is null when the client got an error);
- with ``tensors``, for ModelInfer: ``inputs`` / ``outputs``, each tensor as ``{name, datatype, shape, data}``,
  ``data`` flat in row-major order; non-finite numbers as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
  BYTES elements as UTF-8 text, or (``"encoding": "base64"``) base64 when some element is not UTF-8. A message
  that cannot be decoded gets ``inputs_error`` / ``outputs_error`` (the decoder's reason) instead;
- ``redacted``: the inputs redacted (proxy/observing/redact.py). The request bytes are the redacted ones, and a redacted
  input appears as ``{name, datatype, shape, "redacted": true}`` without data: no value of it is ever written.

An outcome reported later for a captured call (``ReportOutcome``, ``POST /outcomes``) is appended as an *outcome
record*: ``{"record": "outcome", "time", "route", "request_id", "values": [numbers], "labels": [text]}`` (``time``:
Unix seconds it was reported; non-finite values as the strings above). Call records have no ``record`` key.

Numbers and bytes are encoded in pieces (``CHUNK`` elements per ``json.dumps``, ``B64_CHUNK`` bytes per base64
call) and never joined into one large string, so that the writer thread hands the GIL back to the event loop while
it encodes a large tensor.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from mlmirror.config import MODEL_INFER, Capture
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.capture.rotating import SUFFIX
from mlmirror.observing.redact import redact_request
from mlmirror.protocol.codec import DATATYPES
from mlmirror.protocol.kserve import Tensor, TensorError, request_inputs, response_outputs
from mlmirror.protocol.wire import read_string_field

__all__ = ["CHUNK", "OUTCOME", "captured_inputs", "encode_outcome", "encode_record"]

#: Elements encoded per ``json.dumps`` call (about 2 ms of holding the GIL on a slow core).
CHUNK = 2048
#: Bytes per base64 call (a multiple of 3, so that the pieces concatenate into one base64 text).
B64_CHUNK = 3 * 2**16
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
#: The ``record`` value of an outcome record.
OUTCOME = "outcome"


def encode_record(record: CallRecord, spec: Capture, redact: tuple[str, ...] = ()) -> bytes:
    """``record`` as one line of JSON (UTF-8, ending in a newline). Raises ``TensorError`` when ``redact`` names
    inputs and the request cannot be redacted (the caller drops the record)."""
    kserve = record.method == MODEL_INFER
    request = redact_request(record.method, record.request, redact) if redact else record.request
    head: dict[str, object] = {
        "time": record.started,
        "route": record.route,
        "method": record.method,
        "request_id": record.request_id,
        "code": record.code.name,
        "served_by": record.served_by,
        "role": record.role,
        "latency": _number(record.latency),
        "upstream_latency": _number(record.upstream_latency),
    }
    if kserve:
        head["model_name"] = read_string_field(request, 1)
        head["model_version"] = read_string_field(record.response, 2) if record.response is not None else None
    if redact:
        head["redacted"] = list(redact)
    parts = [json.dumps(head)[:-1]]
    if spec.include in ("request", "both"):
        parts += [', "request": "', *_base64(request), '"']
        if kserve and spec.tensors:
            parts += _tensors("inputs", lambda: request_inputs(request)[1], redact)
    if spec.include in ("response", "both"):
        response = record.response
        parts += [', "response": null'] if response is None else [', "response": "', *_base64(response), '"']
        if kserve and spec.tensors and response is not None:
            parts += _tensors("outputs", lambda: response_outputs(response)[1], ())
    parts.append("}\n")
    return b"".join(part.encode() for part in parts)  # small pieces: no long hold of the GIL on a large record


def encode_outcome(
    route: str, request_id: str, values: Sequence[float], labels: Sequence[str], reported: float
) -> bytes:
    """An outcome record as one line of JSON (UTF-8, ending in a newline); ``reported`` is Unix seconds."""
    numbers = [v if math.isfinite(v) else _NON_FINITE.get(v, "NaN") for v in map(float, values)]
    record = {"record": OUTCOME, "time": reported, "route": route, "request_id": request_id,
              "values": numbers, "labels": [str(label) for label in labels]}  # fmt: skip
    return (json.dumps(record) + "\n").encode()


def _base64(data: bytes) -> list[str]:
    """``data`` in base64, in pieces of ``B64_CHUNK`` bytes."""
    view = memoryview(data)
    return [base64.b64encode(view[i : i + B64_CHUNK]).decode() for i in range(0, len(data), B64_CHUNK)]


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _tensors(key: str, decode, redact: tuple[str, ...]) -> list[str]:
    try:
        tensors: list[Tensor] = decode()
    except TensorError as exc:
        return [f', "{key}_error": {json.dumps(exc.reason)}']
    parts = [f', "{key}": [']
    for i, tensor in enumerate(tensors):
        parts += [", "] * (i > 0) + _tensor(tensor, tensor.name in redact)
    return [*parts, "]"]


def _tensor(tensor: Tensor, redacted: bool) -> list[str]:
    head = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    if redacted:
        return [json.dumps({**head, "redacted": True})]
    flat = tensor.values.reshape(-1)
    if tensor.datatype == "BYTES":
        try:
            elements = [element.decode("utf-8") for element in flat]
        except UnicodeDecodeError:
            head["encoding"] = "base64"
            elements = [base64.b64encode(element).decode() for element in flat]
        return [json.dumps(head)[:-1], ', "data": ', json.dumps(elements), "}"]
    return [json.dumps(head)[:-1], ', "data": [', *_numbers(flat), "]}"]


def _numbers(flat: np.ndarray) -> list[str]:
    """The comma-separated JSON numbers of ``flat``, in pieces of ``CHUNK``."""
    pieces = []
    for start in range(0, flat.shape[0], CHUNK):
        chunk = flat[start : start + CHUNK]
        values = chunk.tolist()
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            values = [v if math.isfinite(v) else _NON_FINITE.get(v, "NaN") for v in values]
        pieces += [", "] * (start > 0) + [json.dumps(values)[1:-1]]
    return pieces


# --- reading back --------------------------------------------------------------------------------------------------


def captured_inputs(path: Path) -> list[tuple[str, np.ndarray]]:
    """The input tensors of every captured ModelInfer call in ``path`` (a capture file, or a directory of them
    read oldest first), each concatenated over calls along its first axis: [(name, array)], in the first call's
    order. Redacted inputs are left out; calls without inputs (other methods, ``include: response``, undecodable
    requests) are skipped. Raises ``ValueError`` naming the file and line of a bad record."""
    files = sorted(path.glob(f"*{SUFFIX}")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no capture files (*{SUFFIX})")
    names: list[str] | None = None
    columns: dict[str, list[np.ndarray]] = {}
    for file, line, entry in _entries(files):
        if entry.get("record") == OUTCOME or not isinstance(entry.get("inputs"), list):
            continue
        try:
            tensors = {t["name"]: _array(t) for t in entry["inputs"] if not t.get("redacted")}
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ValueError(f"{file}:{line}: bad tensor in inputs: {exc!r}") from None
        if names is None:
            names = list(tensors)
            columns = {name: [] for name in names}
        elif sorted(tensors) != sorted(names):
            raise ValueError(f"{file}:{line}: inputs {sorted(tensors)} differ from the first call's {sorted(names)}")
        for name, array in tensors.items():
            columns[name].append(array)
    if names is None:
        raise ValueError(f"{path}: no captured ModelInfer inputs (captured with include: response or tensors: false?)")
    return [(name, np.concatenate(columns[name], axis=0)) for name in names]


def _entries(files: list[Path]) -> Iterator[tuple[Path, int, dict]]:
    for file in files:
        with open(file, encoding="utf-8") as lines:
            for number, text in enumerate(lines, 1):
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{file}:{number}: not a capture record: {exc}") from None
                if not isinstance(entry, dict):
                    raise ValueError(f"{file}:{number}: not a capture record: a JSON {type(entry).__name__}")
                yield file, number, entry


def _array(tensor: dict) -> np.ndarray:
    """A captured tensor as an array of its shape (at least one dimension: a scalar is one row)."""
    datatype = tensor["datatype"]
    if datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {datatype!r}")
    shape = tuple(int(d) for d in tensor["shape"])
    data = tensor["data"]
    if datatype == "BYTES":
        decode = base64.b64decode if tensor.get("encoding") == "base64" else str.encode
        values = np.empty(len(data), dtype=object)
        values[:] = [decode(element) for element in data]
    else:
        dtype = DATATYPES[datatype].dtype
        # Floats via float64, which reads "NaN" and "Infinity" (and holds any FP16/FP32 value exactly).
        values = np.array(data, dtype=np.float64 if dtype.kind == "f" else dtype).astype(dtype)
    return values.reshape(shape if shape else (1,))

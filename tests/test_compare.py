"""Shadow comparison: the KServe tensor decoder, the comparator, the promotion verdict and call sampling.

The comparator and the verdict are checked against independent references computed here with plain numpy and
Python floats, not against re-implementations of the same vectorised code.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import tracemalloc
import zlib
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlmirror.config import Compare, Promotion
from mlmirror.observing.shadows.compare import Comparator, Comparison, ProductionAnswer
from mlmirror.observing.shadows.verdict import Outcome, Window, WindowSummary, judge, wilson_lower_bound
from mlmirror.protocol.codec import DATATYPES, encode_bytes_elements
from mlmirror.protocol.kserve import MAX_ELEMENTS, TensorError, decode_bytes_elements, request_inputs, response_outputs
from mlmirror.protocol.names import MODEL_INFER, REQUEST_ID
from mlmirror.protos import inference_pb2
from mlmirror.serving.sampling import RequestIds, sampled, sampling_point

from tests.support import naive_differences

FAST = settings(
    max_examples=max(150, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- building messages ------------------------------------------------------------------------------------------


def sample_values(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values of ``datatype`` with ``shape``, including each integer type's extremes."""
    count = math.prod(shape)
    kind = DATATYPES[datatype]
    if datatype == "BYTES":
        flat = np.empty(count, dtype=object)
        for i in range(count):
            flat[i] = rng.bytes(int(rng.integers(0, 6)))  # includes b""
    elif datatype == "BOOL":
        flat = rng.integers(0, 2, count).astype(bool)
    elif kind.dtype.kind in "iu":
        info = np.iinfo(kind.dtype)
        flat = rng.integers(info.min, info.max, count, dtype=kind.dtype, endpoint=True)
        flat[: min(count, 2)] = [info.min, info.max][: min(count, 2)]
    else:
        flat = (rng.standard_normal(count) * 100).astype(kind.dtype)
    return flat.reshape(shape)


def raw_bytes(datatype: str, values: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return encode_bytes_elements(values.ravel())
    return np.ascontiguousarray(values, dtype=DATATYPES[datatype].dtype).tobytes()


def add_tensor(message, name: str, datatype: str, values: np.ndarray, *, raw: bool) -> None:
    """Append one tensor (output or input) to ``message``, as raw contents or typed contents."""
    tensors = message.outputs if isinstance(message, inference_pb2.ModelInferResponse) else message.inputs
    tensor = tensors.add(name=name, datatype=datatype, shape=list(values.shape))
    if raw:
        contents = (
            message.raw_output_contents
            if isinstance(message, inference_pb2.ModelInferResponse)
            else message.raw_input_contents
        )
        contents.append(raw_bytes(datatype, values))
    else:
        getattr(tensor.contents, DATATYPES[datatype].contents_field).extend(values.ravel().tolist())


def response(*outputs: tuple[str, str, np.ndarray], raw: bool = True) -> bytes:
    message = inference_pb2.ModelInferResponse(model_name="m", model_version="7")
    for name, datatype, values in outputs:
        add_tensor(message, name, datatype, values, raw=raw)
    return message.SerializeToString()


def spec_response(*specs: dict, raw: list[bytes] | None = None) -> bytes:
    """A response built field by field, for malformed messages."""
    message = inference_pb2.ModelInferResponse()
    for spec in specs:
        contents = spec.pop("contents", {})
        tensor = message.outputs.add(**spec)
        for field, values in contents.items():
            getattr(tensor.contents, field).extend(values)
    message.raw_output_contents.extend(raw or [])
    return message.SerializeToString()


def assert_same_values(datatype: str, got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    if datatype == "BYTES":
        assert got.dtype == object
        assert list(got.ravel()) == list(expected.ravel())
        assert all(isinstance(v, bytes) for v in got.ravel())
    else:
        assert got.dtype == DATATYPES[datatype].dtype
        np.testing.assert_array_equal(got, expected)


# --- decoder ----------------------------------------------------------------------------------------------------

SHAPES = [(), (0,), (1,), (5,), (2, 3), (2, 0, 4), (1, 2, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_every_datatype_round_trips(datatype, shape, raw):
    rng = np.random.default_rng(zlib.crc32(repr((datatype, shape, raw)).encode()))
    first = sample_values(datatype, shape, rng)
    second = sample_values(datatype, (2,), rng)
    if datatype == "FP16" and not raw:  # FP16 travels only as raw contents
        message = inference_pb2.ModelInferResponse()
        message.outputs.add(name="a", datatype="FP16", shape=list(shape))
        with pytest.raises(TensorError) as caught:
            response_outputs(message.SerializeToString())
        assert caught.value.reason == "no_contents"
        return
    version, tensors = response_outputs(response(("a", datatype, first), ("b", datatype, second), raw=raw))
    assert version == "7"
    assert [t.name for t in tensors] == ["a", "b"]
    assert [t.datatype for t in tensors] == [datatype, datatype]
    assert tensors[0].shape == shape
    assert_same_values(datatype, tensors[0].values, first)
    assert_same_values(datatype, tensors[1].values, second)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_request_inputs_round_trip(raw):
    rng = np.random.default_rng(3)
    message = inference_pb2.ModelInferRequest(model_name="iris", id="r1")
    arrays = {"x": ("FP32", sample_values("FP32", (4, 3), rng)), "s": ("BYTES", sample_values("BYTES", (2,), rng))}
    for name, (datatype, values) in arrays.items():
        add_tensor(message, name, datatype, values, raw=raw)
    model, tensors = request_inputs(message.SerializeToString())
    assert model == "iris"
    for tensor, (name, (datatype, values)) in zip(tensors, arrays.items(), strict=True):
        assert (tensor.name, tensor.datatype) == (name, datatype)
        assert_same_values(datatype, tensor.values, values)


def test_fp16_raw_keeps_specials():
    values = np.array([0.0, -0.0, 1.5, 65504.0, np.inf, -np.inf, np.nan, 6e-8], dtype="<f2")
    (tensor,) = response_outputs(response(("h", "FP16", values)))[1]
    assert tensor.values.dtype == np.float16
    np.testing.assert_array_equal(tensor.values, values)  # NaN == NaN for assert_array_equal
    assert np.signbit(tensor.values[1])


def test_raw_bytes_elements_are_length_prefixed():
    raw = b"\x03\x00\x00\x00abc" + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x00z" + b"\x02\x00\x00\x00\xff\x00"
    (tensor,) = response_outputs(spec_response({"name": "t", "datatype": "BYTES", "shape": [2, 2]}, raw=[raw]))[1]
    assert tensor.shape == (2, 2)
    assert tensor.values.tolist() == [[b"abc", b""], [b"z", b"\xff\x00"]]
    assert decode_bytes_elements(b"", 0).shape == (0,)
    big = bytes(range(256)) * 3
    assert list(decode_bytes_elements(len(big).to_bytes(4, "little") + big, 1)) == [big]


@pytest.mark.parametrize(
    ("raw", "count"),
    [
        (b"\x03\x00\x00\x00abc", 2),  # too short to hold two length prefixes
        (b"\x01\x00\x00\x00a\x01\x00", 2),  # second length prefix truncated
        (b"\x05\x00\x00\x00abc\x00\x00\x00\x00", 2),  # element runs past the end
        (b"\xff\xff\xff\xff", 1),  # a 4 GiB element in 4 bytes
        (b"\x01\x00\x00\x00ab", 1),  # a byte left over
        (b"\x00", 0),  # bytes left over with no elements
        (b"\x00\x00\x00", 1),  # not even one length prefix
    ],
)
def test_malformed_raw_bytes_elements(raw, count):
    with pytest.raises(TensorError) as caught:
        decode_bytes_elements(raw, count, "t")
    assert caught.value.reason == "byte_length"
    shape = [count] if count else [0]
    with pytest.raises(TensorError) as caught:
        response_outputs(spec_response({"name": "t", "datatype": "BYTES", "shape": shape}, raw=[raw]))
    assert caught.value.reason == "byte_length"


def fp32(n: int) -> bytes:
    return np.zeros(n, "<f4").tobytes()


MALFORMED = {
    "malformed: not protobuf": ("malformed", b"\xff\xff\xff"),
    "malformed: truncated field": ("malformed", b"\x2a\x10\x0a\x01"),
    "raw_count: fewer raw than outputs": (
        "raw_count",
        spec_response(
            {"name": "a", "datatype": "FP32", "shape": [1]},
            {"name": "b", "datatype": "FP32", "shape": [1]},
            raw=[fp32(1)],
        ),
    ),
    "raw_count: raw without outputs": ("raw_count", spec_response(raw=[fp32(1)])),
    "unknown_datatype": ("unknown_datatype", spec_response({"name": "a", "datatype": "FP8", "shape": [1]}, raw=[b"x"])),
    "unknown_datatype: lower case": (
        "unknown_datatype",
        spec_response({"name": "a", "datatype": "fp32", "shape": [1]}, raw=[fp32(1)]),
    ),
    "unknown_datatype: empty": ("unknown_datatype", spec_response({"name": "a", "shape": [1]})),
    "bad_shape: negative": ("bad_shape", spec_response({"name": "a", "datatype": "FP32", "shape": [-1, 3]}, raw=[b""])),
    "bad_shape: 2**31 elements": (
        "bad_shape",
        spec_response({"name": "a", "datatype": "FP32", "shape": [2**31]}, raw=[fp32(1)]),
    ),
    "byte_length: short": (
        "byte_length",
        spec_response({"name": "a", "datatype": "FP32", "shape": [2]}, raw=[fp32(1)]),
    ),
    "byte_length: long": ("byte_length", spec_response({"name": "a", "datatype": "FP64", "shape": [1]}, raw=[fp32(3)])),
    "byte_length: scalar": ("byte_length", spec_response({"name": "a", "datatype": "INT64", "shape": []}, raw=[b""])),
    "byte_length: zero-size": (
        "byte_length",
        spec_response({"name": "a", "datatype": "INT8", "shape": [0]}, raw=[b"x"]),
    ),
    "no_contents: FP16 typed": ("no_contents", spec_response({"name": "a", "datatype": "FP16", "shape": [0]})),
    "element_count: too few": (
        "element_count",
        spec_response({"name": "a", "datatype": "FP32", "shape": [3], "contents": {"fp32_contents": [1, 2]}}),
    ),
    "element_count: wrong field": (
        "element_count",
        spec_response({"name": "a", "datatype": "INT64", "shape": [2], "contents": {"int_contents": [1, 2]}}),
    ),
    "element_count: scalar without value": ("element_count", spec_response({"name": "a", "datatype": "BOOL"})),
    "out_of_range: INT8": (
        "out_of_range",
        spec_response({"name": "a", "datatype": "INT8", "shape": [2], "contents": {"int_contents": [1, 128]}}),
    ),
    "out_of_range: INT8 low": (
        "out_of_range",
        spec_response({"name": "a", "datatype": "INT8", "shape": [1], "contents": {"int_contents": [-129]}}),
    ),
    "out_of_range: INT16": (
        "out_of_range",
        spec_response({"name": "a", "datatype": "INT16", "shape": [1], "contents": {"int_contents": [40000]}}),
    ),
    "out_of_range: UINT8": (
        "out_of_range",
        spec_response({"name": "a", "datatype": "UINT8", "shape": [1], "contents": {"uint_contents": [256]}}),
    ),
    "out_of_range: UINT16": (
        "out_of_range",
        spec_response({"name": "a", "datatype": "UINT16", "shape": [1], "contents": {"uint_contents": [70000]}}),
    ),
}


@pytest.mark.parametrize(("reason", "data"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_each_error_reason(reason, data):
    with pytest.raises(TensorError) as caught:
        response_outputs(data)
    assert caught.value.reason == reason
    assert str(caught.value).startswith(reason + ": ")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("reason", "data"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_each_error_reason_still_after_a_good_tensor_of_the_same_datatype_and_shape(reason, data):
    """Decoding remembers the layouts of good raw tensors; a bad one of the same datatype and shape still fails."""
    bad = inference_pb2.ModelInferResponse.FromString(data) if reason != "malformed" else None
    for spec in bad.outputs if bad is not None else []:
        kind = DATATYPES[spec.datatype] if spec.datatype in DATATYPES and spec.datatype != "BYTES" else None
        count = math.prod(spec.shape)
        if kind is not None and min(spec.shape, default=0) >= 0 and count <= 64:
            good = np.arange(count).astype(kind.dtype).reshape(tuple(spec.shape))
            raw = good.astype(kind.dtype.newbyteorder("<")).tobytes()
            message = inference_pb2.ModelInferResponse()
            message.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
            message.raw_output_contents.append(raw)
            for _ in range(2):  # the second time from the remembered layout
                _, (decoded,) = response_outputs(message.SerializeToString())
                np.testing.assert_array_equal(decoded.values, good)
    with pytest.raises(TensorError) as caught:
        response_outputs(data)
    assert caught.value.reason == reason


def test_request_errors_use_the_same_reasons():
    with pytest.raises(TensorError) as caught:
        request_inputs(b"\xff\xff")
    assert caught.value.reason == "malformed"
    message = inference_pb2.ModelInferRequest()
    message.inputs.add(name="x", datatype="FP32", shape=[4])
    message.raw_input_contents.append(fp32(3))
    with pytest.raises(TensorError) as caught:
        request_inputs(message.SerializeToString())
    assert caught.value.reason == "byte_length"


def test_typed_values_at_the_limits_fit():
    data = spec_response(
        {"name": "a", "datatype": "INT8", "shape": [2], "contents": {"int_contents": [-128, 127]}},
        {"name": "b", "datatype": "UINT16", "shape": [2], "contents": {"uint_contents": [0, 65535]}},
        {"name": "c", "datatype": "UINT64", "shape": [1], "contents": {"uint64_contents": [2**64 - 1]}},
    )
    a, b, c = response_outputs(data)[1]
    assert a.values.tolist() == [-128, 127]
    assert b.values.tolist() == [0, 65535]
    assert c.values.tolist() == [2**64 - 1]


HUGE_SHAPES = [[2**40], [65536, 65536], [2**31], [MAX_ELEMENTS], [2**20, 2**20, 2**20], [2**62, 2**62]]


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_huge_declared_shapes_fail_fast_without_allocating(shape, datatype, raw):
    spec = {"name": "big", "datatype": datatype, "shape": shape}
    if not raw:
        value = {"BYTES": b"x", "BOOL": True, "FP32": 1.0}[datatype]
        spec["contents"] = {DATATYPES[datatype].contents_field: [value] * 4}
    data = spec_response(spec, raw=[b"\x01\x00\x00\x00x" * 4] if raw else None)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(TensorError) as caught:
            response_outputs(data)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = "bad_shape" if math.prod(shape) > MAX_ELEMENTS else ("byte_length" if raw else "element_count")
    assert caught.value.reason == expected
    assert elapsed < 5.0  # refused from the header: reading 2**40 elements would take hours, not a busy second
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "shape", [[0, 2**40], [0, 2**62], [2**31, 0], [1] * 33, [1] * 65], ids=["0x2^40", "0x2^62", "2^31x0", "33d", "65d"]
)
def test_absurd_shapes_are_bad_shapes_even_when_empty(shape: list[int]):
    with pytest.raises(TensorError) as caught:
        response_outputs(spec_response({"name": "a", "datatype": "FP32", "shape": shape}, raw=[b""]))
    assert caught.value.reason == "bad_shape"


@pytest.mark.parametrize("shape", [[2**31 - 1, 2**31 - 1, 0], [2**31 - 1, 2**31 - 1, 2**31 - 1, 0, 7]], ids=str)
def test_empty_shapes_too_large_for_numpy_are_bad_shapes(shape: list[int]):
    """Found by the atheris harness (tests/fuzz/fuzz_kserve.py): each dimension within bounds and no element, but
    numpy refuses the shape, which escaped as a ValueError."""
    for raw in ([b""], None):
        with pytest.raises(TensorError) as caught:
            response_outputs(spec_response({"name": "a", "datatype": "FP32", "shape": shape}, raw=raw))
        assert caught.value.reason == "bad_shape"


def test_a_shape_of_32_unit_dimensions_still_decodes():
    (tensor,) = response_outputs(spec_response({"name": "a", "datatype": "FP32", "shape": [1] * 32}, raw=[fp32(1)]))[1]
    assert tensor.shape == (1,) * 32


def test_an_absurd_shadow_shape_is_a_comparison_error_not_an_exception():
    production = response(("a", "FP32", np.zeros(1, np.float32)))
    shadow = spec_response({"name": "a", "datatype": "BOOL", "shape": [0, 2**31, 2**40]})
    result = Comparator(Compare()).compare(ProductionAnswer(MODEL_INFER, production), shadow)
    assert (result.error, result.agree, result.samples) == ("bad_shape", 0, 1)


@pytest.mark.parametrize(
    ("p", "s"), [(math.inf, -math.inf), (math.inf, 0.0), (-math.inf, 5.0), (math.inf, math.nan), (1e308, math.inf)]
)
def test_an_infinite_value_matches_only_itself(p: float, s: float):
    comparator = Comparator(Compare(atol=1e-6, rtol=1e-4))
    production = response(("y", "FP64", np.array([p])))
    result = comparator.compare(ProductionAnswer(MODEL_INFER, production), response(("y", "FP64", np.array([s]))))
    assert not result.matched
    same = comparator.compare(ProductionAnswer(MODEL_INFER, production), production)
    assert same.matched


def test_huge_finite_differences_do_not_warn():
    production = response(("y", "FP64", np.array([1.7e308, 1.7e308])))
    shadow = response(("y", "FP64", np.array([-1.7e308, -1.7e308])))
    result = Comparator(Compare()).compare(ProductionAnswer(MODEL_INFER, production), shadow)  # warnings are errors
    assert not result.matched
    assert result.elements == 0  # |s - p| overflows to inf: not a finite difference


REASONS = {
    "malformed",
    "raw_count",
    "unknown_datatype",
    "bad_shape",
    "byte_length",
    "no_contents",
    "element_count",
    "out_of_range",
}


def _reason_of(decode, data: bytes) -> str | None:
    """None when ``data`` decodes, else the TensorError's reason; anything else propagates and fails the test."""
    try:
        decode(data)
    except TensorError as exc:
        return exc.reason
    return None


@FAST
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_tensor_error(data):
    assert _reason_of(response_outputs, data) in {None, *REASONS}
    assert _reason_of(request_inputs, data) in {None, *REASONS}


@st.composite
def tensor_specs(draw):
    datatype = draw(st.sampled_from([*DATATYPES, "FP8", ""]))
    # At most 6 dimensions: see the report on shapes of more than 64 dimensions.
    shape = draw(st.lists(st.sampled_from([-1, 0, 1, 2, 3, 2**31, 2**40]), max_size=6))
    if 0 in shape:  # at most one huge dimension beside a zero: see the report on zero-size shapes
        huge = [i for i, d in enumerate(shape) if d >= 2**31]
        for i in huge[1:]:
            shape[i] = 1
    field = draw(st.sampled_from(["none", *sorted({k.contents_field for k in DATATYPES.values() if k.contents_field})]))
    contents = {}
    if field == "bytes_contents":
        contents[field] = draw(st.lists(st.binary(max_size=4), max_size=8))
    elif field in ("fp32_contents", "fp64_contents"):
        contents[field] = draw(st.lists(st.floats(width=32), max_size=8))
    elif field == "bool_contents":
        contents[field] = draw(st.lists(st.booleans(), max_size=8))
    elif field != "none":
        low, high = (0, 2**32 - 1) if field == "uint_contents" else (-(2**31), 2**31 - 1)
        if field == "uint64_contents":
            low, high = 0, 2**64 - 1
        elif field == "int64_contents":
            low, high = -(2**63), 2**63 - 1
        contents[field] = draw(st.lists(st.integers(low, high), max_size=8))
    return {"name": draw(st.text(max_size=3)), "datatype": datatype, "shape": shape, "contents": contents}


@FAST
@given(st.lists(tensor_specs(), max_size=3), st.none() | st.lists(st.binary(max_size=40), max_size=3))
def test_structured_messages_decode_consistently_or_raise_tensor_error(specs, raw):
    data = spec_response(*[dict(s, contents=dict(s["contents"])) for s in specs], raw=raw)
    try:
        _, tensors = response_outputs(data)
    except TensorError:
        return
    assert len(tensors) == len(specs)
    for tensor, spec in zip(tensors, specs, strict=True):
        assert tensor.shape == tuple(spec["shape"])
        assert tensor.values.shape == tensor.shape
        assert tensor.values.dtype == DATATYPES[spec["datatype"]].dtype


# --- comparator against a naive reference ------------------------------------------------------------------------


def reference(production: list[tuple], shadow: list[tuple], atol: float, rtol: float) -> dict:
    """The module docstring's definitions, element by element in Python floats."""
    by_name = {name: values for name, _, values in shadow}
    matched = True
    abs_sum = sq_sum = abs_max = 0.0
    elements = 0
    for name, datatype, p_values in production:
        p_items, s_items = p_values.ravel().tolist(), by_name[name].ravel().tolist()
        if datatype == "BYTES":
            matched &= p_items == s_items
            continue
        close, (a, q, m, n) = naive_differences([float(p) for p in p_items], [float(s) for s in s_items], atol, rtol)
        matched &= close
        abs_sum, sq_sum, abs_max, elements = abs_sum + a, sq_sum + q, max(abs_max, m), elements + n
    return {"matched": matched, "abs_sum": abs_sum, "sq_sum": sq_sum, "abs_max": abs_max, "elements": elements}


def assert_statistics(result: Comparison, expected: dict) -> None:
    assert result.error is None
    assert result.matched is expected["matched"]
    assert result.elements == expected["elements"]
    for key in ("abs_sum", "sq_sum", "abs_max"):
        assert math.isclose(getattr(result, key), expected[key], rel_tol=1e-9, abs_tol=0.0), key


def compare(production: bytes, shadow: bytes, **settings) -> Comparison:
    return Comparator(Compare(**settings)).compare(ProductionAnswer(MODEL_INFER, production), shadow)


NUMERIC = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "UINT32"]


def perturb(datatype: str, p: np.ndarray, rng: np.random.Generator, atol: float, rtol: float) -> np.ndarray:
    """A shadow answer: per element equal, within tolerance, just beyond it, far off, or a special value."""
    dtype = DATATYPES[datatype].dtype
    choice = rng.choice(["equal", "close", "far", "special"], size=p.shape, p=[0.4, 0.3, 0.2, 0.1])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        offset = rng.integers(-3, 4, size=p.shape)
        offset[choice == "equal"] = 0
        wide = p.astype(np.int64) if dtype.itemsize < 8 else p.astype(object)
        return np.clip(wide + offset, info.min, info.max).astype(dtype)
    p64 = p.astype(np.float64)
    tolerance = atol + rtol * np.abs(p64)
    s = p64.copy()
    s += np.where(choice == "close", tolerance * rng.uniform(-0.5, 0.5, p.shape), 0.0)
    s += np.where(choice == "far", tolerance * rng.uniform(3, 1000, p.shape) * rng.choice([-1, 1], p.shape), 0.0)
    specials = rng.choice([np.nan, np.inf, -np.inf], size=p.shape)
    s = np.where(choice == "special", specials, s)
    return s.astype(dtype)


def production_values(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Production answers; floats include NaN, and infinities only where the shadow will repeat them (see report)."""
    values = sample_values(datatype, shape, rng)
    if DATATYPES[datatype].dtype.kind == "f" and values.size:
        flat = values.ravel()
        flat[rng.random(flat.size) < 0.05] = np.nan
    return values


@pytest.mark.parametrize("seed", range(40))
def test_comparator_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    atol, rtol = [(1e-6, 1e-4), (0.0, 1e-3), (1e-2, 0.0), (0.5, 0.1)][seed % 4]
    production_raw, shadow_raw = bool(rng.integers(2)), bool(rng.integers(2))
    types = NUMERIC if production_raw and shadow_raw else [t for t in NUMERIC if t != "FP16"]
    production, shadow = [], []
    for i in range(int(rng.integers(1, 4))):
        datatype = str(rng.choice(types))
        shape = SHAPES[int(rng.integers(len(SHAPES)))] if i else (int(rng.integers(1, 40)), 3)
        p = production_values(datatype, shape, rng)
        s = perturb(datatype, p, rng, atol, rtol)
        if DATATYPES[datatype].dtype.kind == "f" and p.size:
            infinite = rng.random(p.shape) < 0.05
            p[infinite] = s[infinite] = rng.choice([np.inf, -np.inf], size=int(infinite.sum()))
        production.append((f"out{i}", datatype, p))
        shadow.append((f"out{i}", datatype, s))
    if rng.integers(2):  # outputs only the shadow returns are ignored, and outputs are matched by name
        extra = "FP64" if shadow_raw else "FP32"
        shadow.append(("extra", extra, np.full(4, np.nan, dtype=DATATYPES[extra].dtype)))
    shadow.reverse()
    expected = reference(production, shadow, atol, rtol)
    result = compare(response(*production, raw=production_raw), response(*shadow, raw=shadow_raw), atol=atol, rtol=rtol)
    assert_statistics(result, expected)
    assert (result.agree, result.samples) == (int(expected["matched"]), 1)


def test_identical_answers_match_with_zero_error():
    rng = np.random.default_rng(1)
    outputs = [("a", "FP32", sample_values("FP32", (10, 3), rng)), ("b", "INT64", sample_values("INT64", (4,), rng))]
    result = compare(response(*outputs, raw=True), response(*outputs, raw=False))
    assert result == Comparison(True, 1, 1, 0.0, 0.0, 0.0, 34)


@pytest.mark.parametrize(
    ("p", "s", "matched", "elements"),
    [
        (np.nan, np.nan, True, 0),
        (np.inf, np.inf, True, 0),
        (-np.inf, -np.inf, True, 0),
        (np.nan, 1.0, False, 0),
        (1.0, np.nan, False, 0),
        (np.inf, np.nan, False, 0),
        (np.nan, np.inf, False, 0),
        (1.0, np.inf, False, 0),
        (1.0, -np.inf, False, 0),
        (0.0, -0.0, True, 1),
        (1.0, 1.0 + 1e-5, True, 1),
        (1.0, 1.01, False, 1),
        (1e308, -1e308, False, 0),  # the difference overflows: not finite, so not in the statistics
    ],
)
def test_specials(p, s, matched, elements):
    production = [("y", "FP64", np.array([p, 2.0]))]
    shadow = [("y", "FP64", np.array([s, 2.0]))]
    result = compare(response(*production), response(*shadow, raw=False))
    assert result.matched is matched
    assert result.elements == elements + 1
    expected = reference(production, shadow, 1e-6, 1e-4)
    assert_statistics(result, expected)


def test_tolerance_boundaries_are_inclusive():
    def matched(p, s, **tolerance):
        return compare(response(("y", "FP64", np.array([p]))), response(("y", "FP64", np.array([s]))), **tolerance)

    assert matched(1.0, 1.5, atol=0.5, rtol=0.0).matched
    assert not matched(1.0, 1.5000001, atol=0.5, rtol=0.0).matched
    assert matched(2.0, 3.0, atol=0.0, rtol=0.5).matched
    assert matched(-2.0, -3.0, atol=0.0, rtol=0.5).matched  # relative to |production|
    assert not matched(2.0, 3.0, atol=0.0, rtol=0.49).matched
    assert not matched(0.5, 1.0, atol=0.0, rtol=0.5).matched  # relative to production, not the shadow
    result = matched(1.0, 4.0, atol=0.0, rtol=0.0)
    assert (result.abs_sum, result.sq_sum, result.abs_max, result.elements) == (3.0, 9.0, 3.0, 1)


def test_integers_compare_in_float64_without_wrapping():
    p = np.array([-128, 127, 0], dtype=np.int8)
    s = np.array([127, -128, 0], dtype=np.int8)
    result = compare(response(("c", "INT8", p)), response(("c", "INT8", s)))
    assert not result.matched
    assert (result.abs_sum, result.sq_sum, result.abs_max, result.elements) == (510.0, 2 * 255.0**2, 255.0, 3)
    u = np.array([0, 2**32 - 1], dtype=np.uint32)
    result = compare(response(("u", "UINT32", u)), response(("u", "UINT32", u[::-1].copy()), raw=False))
    assert result.abs_max == 2**32 - 1


def test_bytes_outputs_match_when_equal():
    p = np.array([b"cat", b"", b"\x00dog"], dtype=object)
    same = response(("label", "BYTES", p), raw=False)
    result = compare(response(("label", "BYTES", p)), same)
    assert result == Comparison(True, 1, 1)
    s = p.copy()
    s[2] = b"\x00dot"
    result = compare(response(("label", "BYTES", p)), response(("label", "BYTES", s)))
    assert result == Comparison(False, 0, 1)
    # BYTES and numbers together: the numbers carry the statistics, the BYTES only the match.
    scores = np.array([0.5, 0.25])
    result = compare(
        response(("label", "BYTES", p), ("score", "FP64", scores)),
        response(("score", "FP64", scores + 0.25), ("label", "BYTES", p)),
    )
    assert (result.matched, result.abs_sum, result.elements) == (False, 0.5, 2)


def argmax_reference(p: np.ndarray, s: np.ndarray) -> tuple[int, int]:
    rows_p = [p] if p.ndim < 2 else list(p)
    rows_s = [s] if s.ndim < 2 else list(s)
    if p.size == 0:
        return 0, 0
    agree = sum(int(np.argmax(a.ravel()) == np.argmax(b.ravel())) for a, b in zip(rows_p, rows_s, strict=True))
    return agree, len(rows_p)


@pytest.mark.parametrize("seed", range(10))
def test_argmax_agreement_per_row(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 60))
    logits = rng.standard_normal((n, 3)).astype(np.float32)
    shadow = logits + rng.standard_normal((n, 3)).astype(np.float32) * 0.3
    result = compare(
        response(("logits", "FP32", logits)), response(("logits", "FP32", shadow), raw=False), classification="argmax"
    )
    agree, samples = argmax_reference(logits, shadow)
    assert (result.agree, result.samples) == (agree, samples) == (agree, n)
    assert_statistics(result, reference([("l", "FP32", logits)], [("l", "FP32", shadow)], 1e-6, 1e-4))


def test_argmax_shapes():
    def agreement(p, s):
        return compare(response(("y", "FP64", p)), response(("y", "FP64", s)), classification="argmax")

    rank1 = agreement(np.array([0.1, 0.7, 0.2]), np.array([0.2, 0.5, 0.3]))
    assert (rank1.agree, rank1.samples, rank1.matched) == (1, 1, False)
    rank1 = agreement(np.array([0.1, 0.7, 0.2]), np.array([0.6, 0.1, 0.3]))
    assert (rank1.agree, rank1.samples) == (0, 1)
    scalar = agreement(np.array(3.0), np.array(4.0))
    assert (scalar.agree, scalar.samples) == (1, 1)
    rng = np.random.default_rng(5)
    p, s = rng.standard_normal((7, 2, 3)), rng.standard_normal((7, 2, 3))
    result = agreement(p, s)  # argmax over the rest of each row, flattened
    assert (result.agree, result.samples) == argmax_reference(p, s)
    empty = agreement(np.zeros((0, 3)), np.zeros((0, 3)))
    assert (empty.agree, empty.samples, empty.matched) == (0, 0, True)


def test_label_agreement_per_element():
    p = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    s = np.array([[1, 0, 3], [4, 5, 0]], dtype=np.int64)
    result = compare(response(("label", "INT64", p)), response(("label", "INT64", s)), classification="label")
    assert (result.agree, result.samples, result.matched) == (4, 6, False)
    words = np.array([b"a", b"b", b"c"], dtype=object)
    other = np.array([b"a", b"x", b"c"], dtype=object)
    result = compare(response(("w", "BYTES", words)), response(("w", "BYTES", other)), classification="label")
    assert (result.agree, result.samples) == (2, 3)


def test_output_selects_the_classification_output():
    rng = np.random.default_rng(9)
    probs = rng.random((12, 3))
    shadow_probs = rng.random((12, 3))
    label = probs.argmax(axis=1).astype(np.int32)
    production = response(("label", "INT32", label), ("probs", "FP64", probs))
    shadow = response(("probs", "FP64", shadow_probs), ("label", "INT32", shadow_probs.argmax(axis=1).astype(np.int32)))
    result = Comparator(Compare(classification="argmax", output="probs")).compare(
        ProductionAnswer(MODEL_INFER, production), shadow
    )
    assert (result.agree, result.samples) == argmax_reference(probs, shadow_probs)
    # Without ``output`` the first output is classified: the label, one row (rank 1).
    first = compare(production, shadow, classification="argmax")
    assert first.samples == 1
    labels = compare(production, shadow, classification="label", output="label")
    assert (labels.agree, labels.samples) == (int(np.sum(label == shadow_probs.argmax(axis=1))), 12)
    missing = compare(production, shadow, classification="label", output="nope")
    assert (missing.error, missing.agree, missing.samples) == ("missing_output", 0, 1)


def test_argmax_on_bytes_is_an_error():
    words = np.array([[b"a"], [b"b"], [b"c"]], dtype=object)
    result = compare(response(("w", "BYTES", words)), response(("w", "BYTES", words)), classification="argmax")
    assert (result.error, result.matched, result.agree, result.samples) == ("not_numeric", False, 0, 3)


PRODUCTION = response(("probs", "FP32", np.eye(5, 3, dtype=np.float32)), ("label", "INT64", np.arange(5)))
CARRIED = {"none": 1, "argmax": 5, "label": 15}

BAD_SHADOWS = {
    "missing_output": response(("probs", "FP32", np.eye(5, 3, dtype=np.float32))),
    "dtype_mismatch": response(("probs", "FP64", np.eye(5, 3)), ("label", "INT64", np.arange(5))),
    "shape_mismatch": response(("probs", "FP32", np.eye(3, 5, dtype=np.float32)), ("label", "INT64", np.arange(5))),
    "malformed": b"\x0a\xff",
    "byte_length": spec_response({"name": "probs", "datatype": "FP32", "shape": [5, 3]}, raw=[b"\x00" * 59]),
    "unknown_datatype": spec_response({"name": "probs", "datatype": "TF32", "shape": [5, 3]}),
}


@pytest.mark.parametrize("classification", list(CARRIED))
@pytest.mark.parametrize("reason", list(BAD_SHADOWS))
def test_incomparable_shadow_answers_are_errors(reason, classification):
    result = Comparator(Compare(classification=classification)).compare(
        ProductionAnswer(MODEL_INFER, PRODUCTION), BAD_SHADOWS[reason]
    )
    assert result == Comparison(False, 0, CARRIED[classification], error=reason)


def test_a_rank1_shape_mismatch_carries_one_sample():
    production = response(("y", "FP32", np.zeros(4, np.float32)))
    result = compare(production, response(("y", "FP32", np.zeros((4, 1), np.float32))), classification="argmax")
    assert result == Comparison(False, 0, 1, error="shape_mismatch")
    result = compare(production, response(("y", "FP32", np.zeros(3, np.float32))), classification="label")
    assert result == Comparison(False, 0, 4, error="shape_mismatch")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff", "production_malformed"),
        (spec_response({"name": "y", "datatype": "FP8", "shape": [1]}), "production_unknown_datatype"),
        (spec_response({"name": "y", "datatype": "FP32", "shape": [2]}, raw=[b"1234"]), "production_byte_length"),
    ],
)
def test_undecodable_production_answers(data, reason):
    answer = ProductionAnswer(MODEL_INFER, data)
    comparator = Comparator(Compare(classification="argmax"))
    for shadow in (data, PRODUCTION):  # decoded once, failing the same way for every shadow
        result = comparator.compare(answer, shadow)
        assert result == Comparison(False, 0, 0, error=reason)
        assert result.error.startswith("production_")
    with pytest.raises(TensorError) as caught:
        answer.outputs()
    assert caught.value.reason == reason


def test_production_is_decoded_once():
    answer = ProductionAnswer(MODEL_INFER, PRODUCTION)
    first = answer.outputs()
    assert answer.outputs() is first


def test_other_methods_compare_bytes():
    comparator = Comparator(Compare(classification="argmax"))
    method = "/acme.Ranker/Rank"
    assert comparator.compare(ProductionAnswer(method, b"\x01\x02"), b"\x01\x02") == Comparison(True, 1, 1)
    assert comparator.compare(ProductionAnswer(method, b"\x01\x02"), b"\x01\x03") == Comparison(False, 0, 1)
    assert comparator.compare(ProductionAnswer(method, b""), b"") == Comparison(True, 1, 1)
    # Not decoded even when the bytes are a KServe response: same tensors, different encoding, different bytes.
    values = np.arange(3, dtype=np.float32)
    raw, typed = response(("y", "FP32", values)), response(("y", "FP32", values), raw=False)
    assert comparator.compare(ProductionAnswer(method, raw), typed) == Comparison(False, 0, 1)
    assert compare(raw, typed) == Comparison(True, 1, 1, elements=3)


def test_a_response_without_outputs():
    empty = response()
    assert compare(empty, empty) == Comparison(True, 1, 1)
    result = compare(empty, PRODUCTION, classification="argmax")
    assert result == Comparison(False, 0, 1, error="missing_output")


# --- verdict ------------------------------------------------------------------------------------------------------


def z_of(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_by_bisection(k: int, n: int, confidence: float) -> float:
    """The root in [0, p] of f(L) = (p - L)^2 - z^2 L (1 - L) / n (convex, f(0) >= 0 >= f(p))."""
    p, z = k / n, z_of(confidence)

    def f(x: float) -> float:
        return (p - x) ** 2 - z * z * x * (1 - x) / n

    low, high = 0.0, p
    for _ in range(200):
        middle = (low + high) / 2
        if f(middle) > 0:
            low = middle
        else:
            high = middle
    return (low + high) / 2


WILSON_CASES = [
    (k, n, c)
    for n in (1, 2, 10, 100, 1000, 12345)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n})
    for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
]


@pytest.mark.parametrize(("k", "n", "c"), WILSON_CASES)
def test_wilson_lower_bound_solves_the_score_equation(k, n, c):
    lower = wilson_lower_bound(k, n, c)
    p, z = k / n, z_of(c)
    assert 0.0 <= lower <= p
    if k:
        assert lower < p
    assert (p - lower) ** 2 == pytest.approx(z * z * lower * (1 - lower) / n, abs=1e-12)
    assert lower == pytest.approx(wilson_by_bisection(k, n, c), abs=1e-12)


def test_wilson_lower_bound_hand_values():
    assert wilson_lower_bound(100, 100, 0.95) == pytest.approx(100 / (100 + 1.959964**2), abs=1e-6)
    assert wilson_lower_bound(100, 100, 0.95) == pytest.approx(0.963, abs=5e-4)
    assert wilson_lower_bound(50, 100, 0.95) == pytest.approx(0.4038, abs=1e-4)
    assert wilson_lower_bound(0, 100, 0.95) == 0.0
    assert wilson_lower_bound(0, 0, 0.95) == 0.0
    assert wilson_lower_bound(5, 0, 0.95) == 0.0
    # More confidence, lower bound; more trials at the same ratio, higher bound.
    assert wilson_lower_bound(90, 100, 0.99) < wilson_lower_bound(90, 100, 0.95) < wilson_lower_bound(90, 100, 0.8)
    assert wilson_lower_bound(9, 10, 0.95) < wilson_lower_bound(90, 100, 0.95) < wilson_lower_bound(900, 1000, 0.95)


def random_outcomes(rng: np.random.Generator, count: int) -> list[Outcome]:
    outcomes = []
    for _ in range(count):
        production_ok = bool(rng.random() < 0.9)
        samples = int(rng.integers(0, 5))
        elements = int(rng.integers(0, 4))
        abs_values = rng.random(elements)
        outcomes.append(
            Outcome(
                shadow_ok=bool(rng.random() < 0.8),
                production_ok=production_ok,
                agree=int(rng.integers(0, samples + 1)),
                samples=samples,
                shadow_latency=float(rng.exponential(0.05)),
                production_latency=float(rng.exponential(0.04)) if production_ok else math.nan,
                abs_sum=float(abs_values.sum()),
                sq_sum=float((abs_values**2).sum()),
                abs_max=float(abs_values.max()) if elements else 0.0,
                elements=elements,
                compared=bool(rng.random() < 0.7),
            )
        )
    return outcomes


def expected_summary(outcomes: list[Outcome]) -> dict:
    shadow_latency = np.array([o.shadow_latency for o in outcomes])
    production_latency = np.array([o.production_latency for o in outcomes if o.production_ok])
    elements = sum(o.elements for o in outcomes)
    return {
        "calls": len(outcomes),
        "compared": sum(o.compared for o in outcomes),
        "agree": sum(o.agree for o in outcomes),
        "samples": sum(o.samples for o in outcomes),
        "shadow_errors": sum(not o.shadow_ok for o in outcomes),
        "production_errors": sum(not o.production_ok for o in outcomes),
        "shadow_p99": np.quantile(shadow_latency, 0.99),
        "production_p99": np.quantile(production_latency, 0.99) if production_latency.size else math.nan,
        "mae": sum(o.abs_sum for o in outcomes) / elements,
        "rmse": math.sqrt(sum(o.sq_sum for o in outcomes) / elements),
        "abs_max": max(o.abs_max for o in outcomes),
    }


def assert_summary(summary: WindowSummary, expected: dict) -> None:
    for key, value in expected.items():
        assert getattr(summary, key) == pytest.approx(value, rel=1e-12, nan_ok=True), key
    calls, samples = expected["calls"], expected["samples"]
    assert summary.agreement == pytest.approx(expected["agree"] / samples)
    assert summary.shadow_error_ratio == pytest.approx(expected["shadow_errors"] / calls)
    assert summary.production_error_ratio == pytest.approx(expected["production_errors"] / calls)


@pytest.mark.parametrize("count", [1, 2, 7, 100, 1000])
def test_window_summary_against_numpy(count):
    rng = np.random.default_rng(count)
    outcomes = random_outcomes(rng, count)
    outcomes[0] = outcomes[0]._replace(elements=3, abs_sum=1.0, sq_sum=0.5, abs_max=0.5, samples=2, agree=1)
    window = Window(count)
    for outcome in outcomes:
        window.add(outcome)
    assert len(window) == count
    assert_summary(window.summary(), expected_summary(outcomes))


def test_window_keeps_only_the_last_outcomes():
    rng = np.random.default_rng(11)
    outcomes = random_outcomes(rng, 50)
    outcomes = [
        o._replace(elements=1, abs_sum=0.1 * i, sq_sum=0.01 * i, abs_max=0.1 * i) for i, o in enumerate(outcomes)
    ]
    outcomes = [o._replace(samples=1, agree=i % 2) for i, o in enumerate(outcomes)]
    window = Window(20)
    for i, outcome in enumerate(outcomes):
        window.add(outcome)
        assert len(window) == min(i + 1, 20)
    assert_summary(window.summary(), expected_summary(outcomes[-20:]))
    assert window.summary().abs_max == pytest.approx(4.9)


def test_empty_and_degenerate_windows():
    summary = Window(10).summary()
    assert (summary.calls, summary.compared, summary.agree, summary.samples) == (0, 0, 0, 0)
    for value in (summary.shadow_p99, summary.production_p99, summary.mae, summary.rmse, summary.abs_max):
        assert math.isnan(value)
    assert math.isnan(summary.agreement)
    assert math.isnan(summary.shadow_error_ratio)
    assert math.isnan(summary.production_error_ratio)
    window = Window(10)
    for _ in range(3):  # production never answered, nothing compared
        window.add(Outcome(True, False, 0, 0, 0.2, math.nan, 0.0, 0.0, 0.0, 0, False))
    summary = window.summary()
    assert (summary.calls, summary.production_errors, summary.shadow_errors) == (3, 3, 0)
    assert summary.shadow_p99 == pytest.approx(0.2)
    assert math.isnan(summary.production_p99)
    for value in (summary.mae, summary.rmse, summary.abs_max):
        assert math.isnan(value)
    assert math.isnan(summary.agreement)


SPEC = Promotion(min_samples=200, agreement=0.98, confidence=0.95, error_margin=0.01, latency_factor=1.5)


def summary_of(**changes) -> WindowSummary:
    figures = {
        "calls": 1000,
        "compared": 1000,
        "agree": 1000,
        "samples": 1000,
        "shadow_errors": 5,
        "production_errors": 5,
        "shadow_p99": 0.10,
        "production_p99": 0.10,
        "mae": 0.0,
        "rmse": 0.0,
        "abs_max": 0.0,
    }
    figures.update(changes)
    return WindowSummary(**figures)


def test_promotable_when_every_condition_holds():
    verdict = judge(summary_of(), SPEC, 0.0)
    assert verdict.promotable
    assert verdict.reasons == ()
    assert verdict.lower_bound == wilson_lower_bound(1000, 1000, 0.95)
    assert verdict.noise == 0.0
    # Each condition just inside its limit.
    edge = summary_of(agree=990, shadow_errors=14, production_errors=5, shadow_p99=0.149, production_p99=0.1)
    assert wilson_lower_bound(990, 1000, 0.95) > 0.98
    assert judge(edge, SPEC, 0.0).promotable


@pytest.mark.parametrize(
    ("changes", "noise", "fragment"),
    [
        ({"agree": 150, "samples": 150}, 0.0, "needs 200 agreement samples, has 150"),
        ({"agree": 970}, 0.0, "agreement lower bound"),
        ({"agree": 970}, 0.01, "+ noise 0.0100"),
        ({"shadow_errors": 30, "production_errors": 10}, 0.0, "error ratio 3.00% > production 1.00% + 1.00%"),
        ({"shadow_p99": 0.2, "production_p99": 0.1}, 0.0, "p99 200.0 ms > 1.5 x production 100.0 ms"),
        ({"production_p99": math.nan}, 0.0, "p99"),
    ],
)
def test_each_reason_alone(changes, noise, fragment):
    verdict = judge(summary_of(**changes), SPEC, noise)
    assert not verdict.promotable
    assert len(verdict.reasons) == 1
    assert fragment in verdict.reasons[0]


def test_noise_rescues_agreement():
    summary = summary_of(agree=970)
    lower = wilson_lower_bound(970, 1000, 0.95)
    assert lower < 0.98 < lower + 0.03
    verdict = judge(summary, SPEC, 0.03)
    assert verdict.promotable
    assert (verdict.lower_bound, verdict.noise) == (lower, 0.03)
    assert not judge(summary, SPEC, 0.98 - lower - 1e-6).promotable
    assert judge(summary, SPEC, 0.98 - lower + 1e-9).promotable


def test_too_few_samples_is_not_rescued_by_noise_and_hides_agreement():
    verdict = judge(summary_of(agree=10, samples=199), SPEC, 0.5)
    assert verdict.reasons == ("needs 200 agreement samples, has 199",)


def test_all_reasons_together_and_control():
    summary = summary_of(agree=900, shadow_errors=100, shadow_p99=1.0)
    verdict = judge(summary, SPEC, 0.0, control=True)
    assert not verdict.promotable
    assert len(verdict.reasons) == 4
    assert verdict.reasons[0].startswith("control shadow")
    control = judge(summary_of(), SPEC, 0.0, control=True)
    assert not control.promotable
    assert len(control.reasons) == 1
    assert "control" in control.reasons[0]


def test_an_empty_window_needs_samples_only():
    empty = Window(10).summary()
    verdict = judge(empty, SPEC, 0.0)
    assert verdict.reasons == ("needs 200 agreement samples, has 0",)
    assert judge(empty, Promotion(min_samples=0), 0.0).reasons == ("agreement lower bound 0.0000 < 0.98",)


# --- sampling -----------------------------------------------------------------------------------------------------

IDS = [f"req-{i}" for i in range(20000)]


def test_sampling_point_is_blake2b_scaled():
    for request_id in ["", "a", "req-1", "ünïcode", "\ud800 lone surrogate"]:
        digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        assert sampling_point(request_id) == pytest.approx(int.from_bytes(digest, "big") / 2**64 * 100, rel=1e-12)
        assert 0.0 <= sampling_point(request_id) < 100.0


def test_sampling_is_nested():
    for request_id in IDS[:5000]:
        if sampled(request_id, 10):
            assert sampled(request_id, 30)
            assert sampled(request_id, 10.0001)
        if not sampled(request_id, 30):
            assert not sampled(request_id, 10)


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 50, 90])
def test_sampled_fraction(percent):
    fraction = sum(sampled(request_id, percent) for request_id in IDS) / len(IDS) * 100
    assert abs(fraction - percent) < 1.0


def test_sampling_edges():
    for request_id in IDS[:2000]:
        assert not sampled(request_id, 0)
        assert not sampled(request_id, -5)
        assert sampled(request_id, 100)
        assert sampled(request_id, 150)
        assert sampled(request_id, 99.99999999) == (sampling_point(request_id) < 99.99999999)


def infer_request(request_id: str = "") -> bytes:
    return inference_pb2.ModelInferRequest(model_name="iris", id=request_id).SerializeToString()


def test_the_kserve_id_comes_first():
    ids = RequestIds()
    metadata = (("authorization", "x"), (REQUEST_ID, "from-client"))
    request_id, sent = ids.identify(MODEL_INFER, infer_request("from-kserve"), metadata)
    assert request_id == "from-kserve"
    assert sent == metadata  # the client sent one: nothing added
    request_id, sent = ids.identify(MODEL_INFER, infer_request("from-kserve"), (("authorization", "x"),))
    assert request_id == "from-kserve"
    assert sent == (("authorization", "x"), (REQUEST_ID, "from-kserve"))


def test_then_the_client_metadata():
    ids = RequestIds()
    metadata = ((REQUEST_ID, "from-client"), ("other", "y"))
    assert ids.identify(MODEL_INFER, infer_request(), metadata) == ("from-client", metadata)
    assert ids.identify(MODEL_INFER, b"\xff\xff", metadata) == ("from-client", metadata)
    # Other methods' bodies are never read, even when they hold a string field 3.
    assert ids.identify("/acme.Ranker/Rank", infer_request("from-kserve"), metadata) == ("from-client", metadata)


def test_then_an_assigned_unique_id():
    ids = RequestIds()
    seen = set()
    for method, body in [(MODEL_INFER, infer_request()), ("/acme.Ranker/Rank", infer_request("x")), (MODEL_INFER, b"")]:
        request_id, sent = ids.identify(method, body, (("other", "y"),))
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", request_id)
        assert sent == (("other", "y"), (REQUEST_ID, request_id))
        seen.add(request_id)
    assert len(seen) == 3
    other = RequestIds().identify(MODEL_INFER, b"", ())[0]
    assert other.split("-")[0] != next(iter(seen)).split("-")[0]
    assert other not in seen

"""Fuzzing the configuration loader: every input parses or raises ``ConfigError`` naming the file (and the line and
key when one is at fault), never another exception; hostile YAML (alias bombs, deep nesting) is bounded in time and
memory. The hot-path decoders' huge declared shapes are in test_compare.py; the static default and the drift
engine's handling of them are here."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mlmirror.config import Config, Drift, Route, load_config, parse_config
from mlmirror.config.yamlsource import MAX_ALIAS_EXPANSION
from mlmirror.errors import ConfigError
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.protos import inference_pb2
from mlmirror.serving.static_response import StaticResponder

from tests.support import REPO

FUZZ = settings(
    max_examples=max(200, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FILE = "fuzz.yaml"
EXAMPLE = (REPO / "examples" / "mlmirror.yaml").read_text()
VALID = "upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}\nroutes: [{match: {}, primary: a, fallback: [b]}]\n"

#: Scalars YAML may hold, including the odd ones: NaN, infinities, huge numbers, tags that cannot build their value.
ODD_SCALARS = [
    ".nan", ".inf", "-.inf", "1e400", "-1", "0", "9" * 5000, "1" + "0" * 400 + "s", "1e-400", "0x7fffffffffffffff",
    "99999999999h", "1e309ms", "true", "null", "~", "''", '"\\0"', "!!binary aGVsbG8=", "!!binary '==='",
    "!!int xyz", "!!float xyz", "!!bool maybe", "!!timestamp 2001-13-45", "!!python/object:os.system x", "!!set {a}",
    "!!str", "[]", "{}", "[[[]]]", "&x 1", "*undefined", "<<: 1", "'\\ud800'", "2001-01-01", "-1ms", "0.0001us",
]  # fmt: skip


def outcome(text: str, file: str = FILE) -> ConfigError | None:
    """None when ``text`` parses; the ConfigError otherwise (any other exception fails the test). A ConfigError must
    name the file, and a line unless the YAML itself is unreadable."""
    error = None
    try:
        parse_config(text, file)
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert error.file == file
        assert error.reason
        assert error.line is not None or "YAML" in error.reason, error
    return error


# --- random structures and text ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.binary(max_size=8)
)  # fmt: skip
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


def yaml_keys(schema: type, *, not_in_yaml: tuple[str, ...] = ()) -> list[str]:
    """The YAML keys of a config section: the fields of its dataclass in the schema (``mlmirror.config``), less
    those the loader fills in itself. The fuzzers' key lists come from here, so a new key is fuzzed the day it
    exists; if the schema stops being dataclasses, only this changes."""
    return [f.name for f in dataclasses.fields(schema) if f.name not in not_in_yaml]


#: Top-level keys (``source`` is the file's name, not a key), and one the loader must refuse.
KEYS = [*yaml_keys(Config, not_in_yaml=("source",)), "bogus"]


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), structures, max_size=6))
def test_random_top_level_structures_parse_or_raise_config_error(document):
    outcome(yaml.safe_dump(document, allow_unicode=True))


#: Route keys: every field of ``Route`` is one.
ROUTE_KEYS = yaml_keys(Route)


def test_the_fuzzed_keys_are_the_schemas_and_the_loader_knows_each():
    assert {"mode", "listen", "upstreams", "routes"} <= set(KEYS)
    assert {"capture", "redact", "drift", "shadows"} <= set(ROUTE_KEYS)
    for key in KEYS[:-1]:
        error = outcome(yaml.safe_dump({key: None, "upstreams": {"a": "127.0.0.1:1"}, "routes": []}))
        assert error is None or "unknown key" not in error.reason, (key, error)
    for key in ROUTE_KEYS:
        route = {"match": {}, "primary": "a", key: None}
        error = outcome(yaml.safe_dump({"upstreams": {"a": "127.0.0.1:1"}, "routes": [route]}))
        assert error is None or "unknown key" not in error.reason, (key, error)
    assert "unknown key" in outcome("bogus: 1\n" + VALID).reason


@FUZZ
@given(st.dictionaries(st.sampled_from(ROUTE_KEYS), structures, max_size=5), structures)
def test_random_routes_and_upstreams_parse_or_raise_config_error(route, upstream):
    document = {"upstreams": {"a": "127.0.0.1:1", "u": upstream}, "routes": [{"match": {}, "primary": "a", **route}]}
    error = outcome(yaml.safe_dump(document, allow_unicode=True))
    if error is not None and error.key is not None:
        assert error.key.startswith(("upstreams", "routes")), error


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_config_error(text):
    outcome(text)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_file_bytes_load_or_raise_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(data)
    error = None
    try:
        load_config(path)
    except ConfigError as exc:
        error = exc
    assert error is None or error.file == str(path)


# --- the documented example, mutated -----------------------------------------------------------------------------


def _value_lines(text: str) -> list[int]:
    """Lines of ``text`` of the form ``key: value`` (a scalar value, not a comment)."""
    lines = text.splitlines()
    return [i for i, line in enumerate(lines) if ": " in line and not line.lstrip().startswith(("#", "- {"))]


EXAMPLE_LINES = _value_lines(EXAMPLE)


@FUZZ
@given(st.sampled_from(EXAMPLE_LINES), st.sampled_from(ODD_SCALARS))
def test_an_odd_value_anywhere_in_the_example_is_a_located_error(index, odd):
    lines = EXAMPLE.splitlines()
    key, _, _ = lines[index].partition(": ")
    lines[index] = f"{key}: {odd}"
    error = outcome("\n".join(lines) + "\n")
    if error is not None and "YAML" not in error.reason:
        assert error.line is not None


@FUZZ
@given(st.sampled_from(EXAMPLE_LINES))
def test_a_duplicated_key_anywhere_in_the_example_is_reported_where_it_is(index):
    lines = EXAMPLE.splitlines()
    assume(not lines[index].lstrip().startswith("- "))  # a list item's first key: a duplicate makes a new item
    lines.insert(index + 1, lines[index])
    error = outcome("\n".join(lines) + "\n")
    assert error is not None
    assert "duplicate key" in error.reason
    assert error.line == index + 2


@pytest.mark.parametrize("odd", ODD_SCALARS)
@pytest.mark.parametrize("key", ["shutdown_grace", "max_message_size", "listen", "mirror_shed_lag"])
def test_odd_scalars_at_the_top_level(key: str, odd: str):
    error = outcome(f"{key}: {odd}\n{VALID}")
    if error is not None and "YAML" not in error.reason and "merge" not in error.reason:
        assert (error.line, error.key) == (1, key), error


@pytest.mark.parametrize("duration", ["99999999999h", "1" + "0" * 400 + "s", "367d", "8761h"])
def test_durations_beyond_a_year_are_refused(duration: str):
    """gRPC treats a timeout of ~300 years or more as already expired: such an upstream timeout would fail every
    call with DEADLINE_EXCEEDED."""
    error = outcome(f"upstreams: {{a: {{address: 127.0.0.1:1, timeout: {duration}}}}}\nroutes: [{{match: {{}}, "
                    "primary: a}]\n")  # fmt: skip
    assert error is not None
    assert error.key == "upstreams.a.timeout"


# --- alias bombs and deep nesting ---------------------------------------------------------------------------------


def billion_laughs(levels: int, width: int = 10) -> str:
    """A route list whose items alias a list of aliases of ... (``width ** levels`` leaves once expanded)."""
    lines = ["upstreams: {a: 127.0.0.1:1}", "routes:", "  - match: {}", "    primary: a", "    drift:",
             "      outputs: &l0 [x, x, x, x, x, x, x, x, x, x]"]  # fmt: skip
    for level in range(1, levels + 1):
        lines.append(f"      export_bins: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int, width: int = 9) -> str:
    """Merge keys (``<<``) over aliases of mappings that merge aliases of ... ."""
    lines = ["upstreams:", "  a: &m0 {address: 127.0.0.1:1}"]
    for level in range(1, levels + 1):
        lines.append(f"  m{level}: &m{level} {{<<: [{', '.join([f'*m{level - 1}'] * width)}]}}")
    return "\n".join([*lines, "routes: [{match: {}, primary: a}]"]) + "\n"


def cubic_bomb(n: int) -> str:
    """Routes aliasing a static response whose outputs alias one tensor of ``n`` values: n**3 values to read."""
    data = f"&d [{', '.join(['1'] * n)}]"
    tensor = f"&t {{name: o, datatype: FP32, shape: [{n}], data: {data}}}"
    outputs = f"&o [{', '.join([tensor] + ['*t'] * (n - 1))}]"
    route = f"&r {{match: {{}}, primary: a, static_response: {{outputs: {outputs}}}}}"
    return f"upstreams: {{a: 127.0.0.1:1}}\nroutes: [{', '.join([route] + ['*r'] * (n - 1))}]\n"


def _bounded(text: str) -> tuple[ConfigError | None, float, int]:
    """(outcome, seconds, peak traced bytes) of parsing ``text``."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        error = outcome(text)
        return error, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "text",
    [billion_laughs(9), merge_bomb(12), cubic_bomb(120), "routes: &r [*r]\n", "a: &a {<<: *a}\n"],
    ids=["billion-laughs", "merge-bomb", "cubic", "self-alias", "self-merge"],
)
def test_alias_bombs_are_refused_quickly_and_in_little_memory(text: str):
    error, seconds, peak = _bounded(text)
    assert error is not None
    assert "alias" in error.reason or "duplicate" in error.reason
    assert seconds < 20.0  # bounded: the unbounded loader took minutes on cubic(120); a busy machine, seconds
    assert peak < 16 << 20


def test_aliases_within_the_budget_still_work():
    anchored = "upstreams:\n  a: &d {address: 127.0.0.1:1, timeout: 1s}\n  b: {<<: *d, keepalive: {time: 5s}}\n"
    config = parse_config(anchored + "routes: [{match: {}, primary: a, fallback: [b]}]\n")
    assert config.upstreams["b"].timeout == 1.0
    assert config.upstreams["b"].address == "127.0.0.1:1"
    small = outcome(billion_laughs(2))  # 110 aliased nodes: within MAX_ALIAS_EXPANSION, refused for other reasons
    assert small is not None
    assert "alias" not in small.reason
    error = outcome(billion_laughs(3))  # over 10**4
    assert error is not None
    assert f"at most {MAX_ALIAS_EXPANSION}" in error.reason


@pytest.mark.parametrize("depth", [200, 5000, 50000])
@pytest.mark.parametrize("brackets", [("[", "]"), ("{a: ", "}")], ids=["lists", "mappings"])
def test_deep_nesting_is_an_error_not_a_recursion_error(depth: int, brackets: tuple[str, str]):
    opening, closing = brackets
    error = outcome(f"listen: {opening * depth}1{closing * depth}\n{VALID}")
    assert error is not None


def test_an_unreadable_token_file_is_a_located_error(tmp_path: Path):
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    config = tmp_path / "c.yaml"
    config.write_text(f"admin_token_file: token\n{VALID}")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert (caught.value.line, caught.value.key) == (1, "admin_token_file")


# --- huge declared shapes off the hot path ------------------------------------------------------------------------


def _request(shape: list[int], raw: bytes = b"") -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request.SerializeToString()


HUGE = [[2**62], [2**62, 2**62], [2**31 - 1, 4], [0, 2**62], [-(2**62), 4]]


@pytest.mark.parametrize("shape", HUGE, ids=str)
def test_the_static_default_caps_a_huge_declared_batch(shape: list[int]):
    config = parse_config(
        "upstreams: {a: 127.0.0.1:1}\nroutes: [{match: {}, primary: a, static_response: {outputs: "
        "[{name: p, datatype: FP32, shape: [-1, 2], data: [0.5, 0.5]}]}}]\n"
    )
    responder = StaticResponder(config.routes[0].static_response)
    tracemalloc.start()
    try:
        answer = inference_pb2.ModelInferResponse.FromString(responder.render(_request(shape)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 1 <= answer.outputs[0].shape[0] <= 65536
    assert peak < 64 << 20  # at most 65536 rows of 2 floats, encoded


@pytest.mark.parametrize("shape", HUGE, ids=str)
def test_the_drift_engine_counts_huge_declared_shapes_as_decode_errors(shape: list[int]):
    engine = DriftEngine("m", Drift(capture=10, window=10))
    response = inference_pb2.ModelInferResponse(model_name="m", model_version="1").SerializeToString()
    record = CallRecord(
        route="m", method="/inference.GRPCInferenceService/ModelInfer", request=_request(shape, b"\0" * 16),
        response=response, code=grpc.StatusCode.OK, served_by="a", role="primary", request_id="", metadata=(),
        started=0.0, latency=0.0, upstream_latency=0.0,
    )  # fmt: skip
    tracemalloc.start()
    try:
        for _ in range(20):
            engine.offer(record)
        engine.drain()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(engine.decode_errors.values()) == 20
    assert "internal" not in engine.decode_errors
    assert peak < 16 << 20

"""Configuration: every documented key reads back; every mistake is reported with file, line and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest
from mlmirror.config import DEFAULT_FALLBACK_CODES, load_config, parse_config
from mlmirror.errors import ConfigError

from tests.support import REPO

MINIMAL = """\
upstreams:
  a: 127.0.0.1:9001
routes:
  - match: {}
    primary: a
"""


def test_the_example_config_loads_with_every_key_read():
    config = load_config(REPO / "examples" / "mlmirror.yaml")
    assert config.listen == "0.0.0.0:8500"
    assert config.admin == "127.0.0.1:9500"
    assert config.max_message_size == 4 * 2**20
    assert config.stream_replay_limit == 2**20
    assert config.shutdown_grace == 15.0
    assert config.method_types["/acme.Ranker/Rank"] == "unary_unary"
    iris = config.upstreams["iris-v1"]
    assert iris.timeout == 2.0
    assert (iris.keepalive.time, iris.keepalive.timeout) == (30.0, 10.0)
    assert (iris.circuit.failures, iris.circuit.ejection, iris.circuit.max_ejection) == (5, 5.0, 60.0)
    assert iris.circuit.codes == DEFAULT_FALLBACK_CODES
    assert (iris.health_check.type, iris.health_check.interval, iris.health_check.timeout) == ("connect", 5.0, 1.0)
    assert config.upstreams["iris-baseline"].address == "127.0.0.1:9003"
    assert config.upstreams["ranker"].tls is not None
    assert config.upstreams["ranker"].tls.server_name == "ranker.internal"
    names = [route.name for route in config.routes]
    assert names == ["iris", "ranker", "default"]
    iris_route = config.routes[0]
    assert iris_route.chain == ("iris-v1", "iris-baseline")
    assert iris_route.static_response is not None
    assert [t.name for t in iris_route.static_response.outputs] == ["probabilities", "label"]
    assert iris_route.static_response.outputs[0].shape == (-1, 3)
    assert config.routes[1].match.method == "/acme.Ranker/*"
    assert config.mirror_shed_lag == 0.05
    v2, twin = iris_route.shadows
    assert (v2.name, v2.upstream, v2.percent, v2.timeout, v2.max_inflight, v2.queue_size, v2.control) == (
        "v2",
        "iris-v2",
        100.0,
        2.0,
        32,
        256,
        False,
    )
    assert v2.max_message_size == 4 * 2**20
    assert (twin.name, twin.percent, twin.control) == ("iris-v1-twin", 10.0, True)
    assert (iris_route.compare.classification, iris_route.compare.output) == ("argmax", "probabilities")
    assert (iris_route.compare.atol, iris_route.compare.rtol) == (1e-6, 1e-4)
    promotion = iris_route.promotion
    assert (promotion.window, promotion.min_samples, promotion.agreement, promotion.confidence) == (
        1000,
        200,
        0.98,
        0.95,
    )
    assert (promotion.error_margin, promotion.latency_factor, promotion.demote_to) == (0.01, 1.5, "shadow")
    drift = iris_route.drift
    assert [(f.name, f.input, f.column, f.categorical) for f in drift.features] == [
        ("sepal_length", "input", 0, False), ("petal_length", "input", 2, False)
    ]  # fmt: skip
    assert drift.outputs == ("probabilities", "label")
    assert (drift.attribution.target, drift.attribution.output, drift.attribution.threshold) == (
        "probabilities[2]", None, 0.9
    )  # fmt: skip
    capture = iris_route.capture
    assert capture.path == str(REPO / "examples" / "captures" / "iris")
    assert (capture.percent, capture.include, capture.tensors) == (1.0, "both", True)
    assert (capture.max_file_bytes, capture.max_files, capture.queue_size) == (64 * 2**20, 10, 1000)
    assert iris_route.redact == ("patient_id",)
    truth = drift.ground_truth
    assert (truth.output, truth.task, truth.ttl, truth.max_pending, truth.window) == (
        "probabilities", "classification", 3600.0, 20000, 1000
    )  # fmt: skip
    assert (drift.bins, drift.window, drift.capture, drift.profile) == (10, 1000, 1000, None)
    assert (drift.window_time, drift.sliding, drift.calibrate) == (300.0, 6, 3.0)
    assert (drift.model_version, drift.export_bins) == ("unknown", ("petal_length",))
    assert (drift.methods, drift.detect, drift.queue_size, drift.history) == (("ks", "psi", "js"), "ks", 10000, 20)
    assert (drift.threshold("ks"), drift.threshold("psi"), drift.threshold("js"), drift.threshold("chi2")) == (
        0.01, 0.2, 0.1, 0.01
    )  # fmt: skip


def test_defaults_apply_when_keys_are_absent():
    config = parse_config(MINIMAL)
    assert config.listen == "0.0.0.0:8500"
    assert config.admin == "127.0.0.1:9500"
    upstream = config.upstreams["a"]
    assert upstream.timeout is None
    assert upstream.circuit.failures == 5
    assert upstream.health_check.type == "connect"
    assert config.routes[0].name == "default"
    assert config.routes[0].fallback_on == DEFAULT_FALLBACK_CODES


def test_the_cpu_pressure_limit_is_off_by_default_and_takes_a_share():
    assert parse_config(MINIMAL).observer.cpu_pressure_limit is None
    assert parse_config("observer: {cpu_pressure_limit: 0.8}\n" + MINIMAL).observer.cpu_pressure_limit == 0.8
    assert parse_config("observer: {cpu_pressure_limit: off}\n" + MINIMAL).observer.cpu_pressure_limit is None
    assert "must be <= 1.0" in str(_error("observer: {cpu_pressure_limit: 1.5}\n" + MINIMAL))


def test_the_observer_waits_for_serving_by_default_and_off_turns_it_off():
    assert parse_config(MINIMAL).observer.serving_idle == 0.4
    assert parse_config("observer: {serving_idle: 0.25}\n" + MINIMAL).observer.serving_idle == 0.25
    assert parse_config("observer: {serving_idle: off}\n" + MINIMAL).observer.serving_idle is None
    error = str(_error("observer: {serving_idle: 2}\n" + MINIMAL))
    assert "observer.serving_idle" in error
    assert "must be <= 1" in error


def test_durations_and_sizes_take_units():
    config = parse_config(
        "shutdown_grace: 1.5m\nmax_message_size: 512KiB\nstream_replay_limit: 2MB\nadmin: off\n"
        "upstreams:\n  a: {address: '[::1]:9001', timeout: 250ms}\nroutes:\n  - {match: {}, primary: a}\n"
    )
    assert config.shutdown_grace == 90.0
    assert config.max_message_size == 512 * 1024
    assert config.stream_replay_limit == 2_000_000
    assert config.admin is None
    assert config.upstreams["a"].timeout == pytest.approx(0.25)
    assert config.upstreams["a"].address == "[::1]:9001"


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), "conf.yaml")
    return caught.value


BAD_CONFIGS = {
    "unknown key": (
        """\
        listne: 0.0.0.0:8500
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a}]
        """,
        1,
        "listne",
        "unknown key (did you mean 'listen'?)",
    ),
    "unknown upstream": (
        """\
        upstreams:
          a: 127.0.0.1:1
        routes:
          - match: {}
            primary: b
        """,
        5,
        "routes[0].primary",
        "unknown upstream 'b' (defined: a)",
    ),
    "duration without unit": (
        """\
        upstreams:
          a:
            address: 127.0.0.1:1
            timeout: 2
        routes: [{match: {}, primary: a}]
        """,
        4,
        "upstreams.a.timeout",
        "bad duration 2",
    ),
    "duplicate key": (
        """\
        upstreams:
          a: 127.0.0.1:1
          a: 127.0.0.1:2
        routes: [{match: {}, primary: a}]
        """,
        3,
        "upstreams.a",
        "duplicate key (first given on line 2)",
    ),
    "unknown status code": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}
        routes:
          - match: {}
            primary: a
            fallback: [b]
            fallback_on: [UNAVAILABLE, TIMEOUT]
        """,
        6,
        "routes[0].fallback_on[1]",
        "unknown gRPC status code 'TIMEOUT'",
    ),
    "unreachable route": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - match: {}
            primary: a
          - match: {model: iris}
            primary: a
        """,
        5,
        "routes[1]",
        "this route can never match: routes[0] (default) above takes its calls",
    ),
    "static data does not fit the shape": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - match: {}
            primary: a
            static_response:
              outputs:
                - {name: p, datatype: FP32, shape: [-1, 3], data: [0.5, 0.5]}
        """,
        7,
        "routes[0].static_response.outputs[0].data",
        "2 values given, shape [-1, 3] needs 3",
    ),
    "static data of the wrong type": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - match: {}
            primary: a
            static_response:
              outputs:
                - {name: p, datatype: INT8, shape: [1], data: [300]}
        """,
        7,
        "routes[0].static_response.outputs[0].data",
        "INT8 elements must lie in [-128, 127]",
    ),
    "bad address": (
        """\
        upstreams: {a: "localhost"}
        routes: [{match: {}, primary: a}]
        """,
        1,
        "upstreams.a",
        "bad address 'localhost'",
    ),
    "route names collide": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - {name: x, match: {model: m}, primary: a}
          - {name: x, match: {}, primary: a}
        """,
        4,
        "routes[1]",
        "route name 'x' is used twice",
    ),
    "missing TLS file": (
        """\
        upstreams:
          a:
            address: 127.0.0.1:1
            tls: {ca: /nonexistent/ca.pem}
        routes: [{match: {}, primary: a}]
        """,
        4,
        "upstreams.a.tls.ca",
        "no such file: /nonexistent/ca.pem",
    ),
    "jitter out of range": (
        """\
        upstreams:
          a: {address: 127.0.0.1:1, circuit: {jitter: 0.9}}
        routes: [{match: {}, primary: a}]
        """,
        2,
        "upstreams.a.circuit.jitter",
        "must be <= 0.5",
    ),
    "bad method pattern": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {method: Predict}, primary: a}]
        """,
        2,
        "routes[0].match.method",
        "bad method 'Predict'",
    ),
    "unknown call type": (
        """\
        method_types: {/a.B/C: bidi}
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a}]
        """,
        1,
        "method_types./a.B/C",
        "unknown call type 'bidi'",
    ),
    "missing required key": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes:
          - match: {}
        """,
        3,
        "routes[0]",
        "missing required key 'primary'",
    ),
    "fallback repeats the primary": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a, fallback: [a]}]
        """,
        2,
        "routes[0].fallback[0]",
        "upstream 'a' is already in this route's chain",
    ),
    "shadow percent above 100": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}
        routes:
          - match: {}
            primary: a
            shadows:
              - upstream: b
                percent: 150
        """,
        7,
        "routes[0].shadows[0].percent",
        "must be <= 100.0, got 150.0",
    ),
    "negative shadow percent": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}
        routes: [{match: {}, primary: a, shadows: [{upstream: b, percent: -1}]}]
        """,
        2,
        "routes[0].shadows[0].percent",
        "must be >= 0.0",
    ),
    "shadow of an unknown upstream": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a, shadows: [{upstream: nope}]}]
        """,
        2,
        "routes[0].shadows[0].upstream",
        "unknown upstream 'nope'",
    ),
    "shadow is the primary": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a, shadows: [{upstream: a}]}]
        """,
        2,
        "routes[0].shadows[0].upstream",
        "is this route's primary",
    ),
    "two shadows with one name": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}
        routes: [{match: {}, primary: a, shadows: [{upstream: b}, {upstream: b}]}]
        """,
        2,
        "routes[0].shadows[1]",
        "shadow name 'b' is used twice",
    ),
    "transport h2 to several addresses": (
        """\
        upstreams: {a: 127.0.0.1:1, b: "ipv4:10.0.0.1:2,10.0.0.2:2"}
        routes:
          - match: {}
            primary: a
            shadows: [{upstream: b, transport: h2}]
        """,
        5,
        "routes[0].shadows[0].transport",
        "transport h2 reaches one host",
    ),
    "unknown transport": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}
        routes: [{match: {}, primary: a, shadows: [{upstream: b, transport: quic}]}]
        """,
        2,
        "routes[0].shadows[0].transport",
        "unknown transport 'quic'",
    ),
    "two controls": (
        """\
        upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2, c: 127.0.0.1:3}
        routes:
          - match: {}
            primary: a
            shadows: [{upstream: b, control: true}, {upstream: c, control: true}]
        """,
        5,
        "routes[0].shadows[1].control",
        "at most one control shadow",
    ),
    "unknown classification": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a, compare: {classification: top5}}]
        """,
        2,
        "routes[0].compare.classification",
        "unknown classification 'top5'",
    ),
    "min_samples beyond the window": (
        """\
        upstreams: {a: 127.0.0.1:1}
        routes: [{match: {}, primary: a, promotion: {window: 100, min_samples: 500}}]
        """,
        2,
        "routes[0].promotion.min_samples",
        "exceeds window (100)",
    ),
    "wrong container": (
        """\
        upstreams: [a, b]
        routes: []
        """,
        1,
        "upstreams",
        "expected a mapping, got a list",
    ),
}


@pytest.mark.parametrize(("text", "line", "key", "reason"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_errors_name_file_line_and_key(text: str, line: int, key: str, reason: str):
    error = _error(text)
    assert error.file == "conf.yaml"
    assert error.line == line
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"conf.yaml:{line}: {key}: ")


def test_invalid_yaml_syntax_names_the_line():
    error = _error("upstreams:\n  a: [127.0.0.1:1\nroutes: []\n")
    assert error.line == 3
    assert "invalid YAML" in error.reason


def test_a_missing_file_is_reported_as_such(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert str(caught.value) == f"{tmp_path / 'absent.yaml'}: no such file"


def test_upstream_addresses_may_be_grpc_target_uris():
    config = parse_config(
        "upstreams:\n  a: dns:///models.internal:9000\n  b: {address: 'unix:///run/model.sock'}\n"
        "routes: [{match: {}, primary: a, fallback: [b]}]\n"
    )
    assert config.upstreams["a"].address == "dns:///models.internal:9000"
    assert config.upstreams["b"].address == "unix:///run/model.sock"


def test_status_code_names_are_case_insensitive():
    config = parse_config(
        "upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2}\n"
        "routes: [{match: {}, primary: a, fallback: b, fallback_on: [unavailable, internal]}]\n"
    )
    assert config.routes[0].fallback == ("b",)
    assert config.routes[0].fallback_on == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}


@pytest.mark.process
def test_check_config_command_exits_nonzero_with_the_location(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  a: {address: 127.0.0.1:1, timeout: fast}\nroutes: [{match: {}, primary: a}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "mlmirror", "check-config", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 1
    assert f"{bad}:2: upstreams.a.timeout: bad duration 'fast'" in result.stderr

    good = subprocess.run(
        [sys.executable, "-m", "mlmirror", "check-config", str(REPO / "examples" / "mlmirror.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0, good.stderr
    assert "ok: listen 0.0.0.0:8500" in good.stdout


LONG_PATH = "x" * 5000  # longer than any file name the system takes: stat fails with ENAMETOOLONG
ROUTE = "routes: [{match: {}, primary: a}]\n"
UPSTREAM = "upstreams: {a: 127.0.0.1:1}\n"

#: Every kind of key naming a path checked on disk: (document with PATH in it, line, key).
PATH_KEYS = {
    "capture.path": (UPSTREAM + "routes: [{match: {}, primary: a, capture: {path: PATH}}]\n", 2,
                     "routes[0].capture.path"),
    "drift.profile": (UPSTREAM + "routes: [{match: {}, primary: a, drift: {profile: PATH}}]\n", 2,
                      "routes[0].drift.profile"),
    "admin_token_file": ("admin_token_file: PATH\n" + UPSTREAM + ROUTE, 1, "admin_token_file"),
    "upstream tls.ca": ("upstreams: {a: {address: 127.0.0.1:2, tls: {ca: PATH}}}\n" + ROUTE, 1,
                        "upstreams.a.tls.ca"),
    "listener tls.cert": ("tls: {cert: PATH, key: PATH}\n" + UPSTREAM + ROUTE, 1, "tls.cert"),
}  # fmt: skip


@pytest.mark.parametrize(("path", "reason"), [(LONG_PATH, "File name too long"), ("caps\\0dir", "NUL character")])
@pytest.mark.parametrize(("text", "line", "key"), PATH_KEYS.values(), ids=PATH_KEYS.keys())
def test_a_path_the_system_refuses_is_a_located_error(path: str, reason: str, text: str, line: int, key: str):
    error = _error(text.replace("PATH", f'"{path}"'))
    assert (error.line, error.key) == (line, key)
    assert reason in error.reason
    assert len(str(error)) < 400  # the path is cut short in the message


def test_the_package_exports_the_names_exported_before_the_schema_split_and_all_of_the_schema():
    """The names exported before the split (plus ``Observer``, the observing process's section, added since) are
    still there; so is every name of the schema modules' ``__all__``."""
    import mlmirror.config as config
    from mlmirror.config import schema, schema_observing, schema_process

    assert {"CALL_TYPES", "CAPTURE_INCLUDE", "CLASSIFICATION_MODES", "DEFAULT_FALLBACK_CODES", "DEMOTE_TO",
            "DRIFT_METHODS", "MODEL_INFER", "MODES", "Attribution", "Capture", "CircuitPolicy", "Compare", "Config",
            "Drift", "DriftFeature", "GroundTruth", "HealthCheck", "Keepalive", "Multivariate", "Observer",
            "Promotion", "Route", "RouteMatch", "Shadow", "StaticResponse", "StaticTensor", "TlsClient",
            "TlsServer", "Upstream", "load_config", "parse_config"} <= set(config.__all__)  # fmt: skip
    modules = (schema, schema_observing, schema_process)
    assert set(config.__all__) == {*(name for m in modules for name in m.__all__), "load_config", "parse_config"}
    assert all(getattr(config, name) is not None for name in config.__all__)

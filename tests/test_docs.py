"""The reference docs against the code: every configuration key in the schema is documented with the default a
config without it really gets, every documented key exists, and the example config parses; every metric a live
proxy exports or the code defines is in docs/METRICS.md and every one there exists; likewise for the admin
endpoints in docs/ENDPOINTS.md."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from mlmirror.admin.endpoints import ENDPOINTS
from mlmirror.config import Config, load_config, parse_config
from mlmirror.config.docs import BEGIN, END, reference, replace_reference
from mlmirror.config.keys import KeyDoc, schema_keys
from mlmirror.config.yamlsource import parse_duration, parse_yaml
from mlmirror.errors import ConfigError
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, exposition_with_every_metric, http_get, model_server, through_proxy

CONFIGURATION = REPO / "docs" / "CONFIGURATION.md"
SCHEMA = {doc.path: doc for doc in schema_keys(Config)}


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell is backquoted, split on unescaped ``|``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def documented_keys(file: Path = CONFIGURATION) -> dict[str, tuple[str, str, str]]:
    """key path -> (type, default, meaning), as docs/CONFIGURATION.md gives them."""
    rows = table_rows(file.read_text(encoding="utf-8"))
    keys = {}
    for row in rows:
        assert len(row) == 4, row
        path = row[0].strip("`")
        assert path not in keys, f"{path} is documented twice"
        keys[path] = (row[1], row[2], row[3])
    return keys


def test_the_committed_reference_is_what_the_schema_generates():
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1
    assert text.count(END) == 1
    assert replace_reference(text, reference()) == text, "run: python -m mlmirror.config.docs --write " + str(
        CONFIGURATION.relative_to(REPO)
    )


def test_every_schema_key_is_documented_and_every_documented_key_exists():
    documented = documented_keys()
    assert set(SCHEMA) - set(documented) == set(), "schema keys missing from docs/CONFIGURATION.md"
    assert set(documented) - set(SCHEMA) == set(), "documented keys the schema does not have"
    for path, doc in SCHEMA.items():
        assert doc.description, f"{path} has no description"
        assert documented[path][2] == doc.description


# --- the documented defaults are what a config without the key gets -----------------------------------------------

#: A config with every section present and as few keys as each needs, so that every other key takes its default.
SECTIONS = """\
upstreams:
  a: {{address: 127.0.0.1:1, tls: {{}}}}
  b: 127.0.0.1:2
routes:
  - match: {{}}
    primary: a
    static_response:
      outputs: [{{name: p, datatype: FP32, shape: [1], data: [0.5]}}]
    shadows: [{{upstream: b}}]
    drift:
      features: [{{input: x}}]
      ground_truth: {{output: p}}
      attribution: {{}}
    capture: {{path: {capture}}}
"""


BARE = "upstreams: {a: 127.0.0.1:1}\nroutes: [{match: {}, primary: a}]\n"
_ABSENT = object()  # a key under a section the config does not have


def _loaded(config: Config, path: str) -> Any:
    """The value at the documented ``path`` in ``config`` (``[]``: the first item, ``<name>``: upstream a)."""
    value: Any = config
    for part in path.split("."):
        if value is None:
            return _ABSENT
        name, is_list = part.removesuffix("[]"), part.endswith("[]")
        if name == "<name>":
            value = value["a"]
            continue
        value = getattr(value, {"data": "values"}.get(name, name))
        if is_list:
            value = value[0]
    return value


def _documented_value(doc: KeyDoc, text: str) -> Any:
    """The value a default cell such as ``2s``, ``4MiB``, ``[UNAVAILABLE]`` or ``true`` stands for."""
    if doc.kind == "duration":
        return parse_duration(text)
    if doc.kind == "size":
        return parse_yaml(f"v: {text}", "docs").mapping(["v"])["v"].size(minimum=0)
    if doc.kind == "codes":
        return frozenset(grpc.StatusCode[name] for name in yaml.safe_load(text))
    if doc.kind == "number":
        return float(text)  # 1e-6: YAML 1.1 reads it as a string
    if text == '""':
        return ""
    value = yaml.safe_load(text)
    return tuple(value) if isinstance(value, list) else value


def _defaults_checked(tmp_path: Path, file: Path = CONFIGURATION) -> list[str]:
    """Check each documented default against a loaded config without the key; the keys checked."""
    full = parse_config(SECTIONS.format(capture=tmp_path / "caps"), str(tmp_path / "c.yaml"))
    bare = parse_config(BARE)
    documented = documented_keys(file)
    checked = []
    for path, doc in SCHEMA.items():
        cell = documented[path][1]
        if path.endswith(".<method>"):  # free-form keys: the mapping's default
            loaded = _loaded(full, path.removesuffix(".<method>"))
            pairs = dict((m, float(t)) for m, t in re.findall(r"(\w+) `([^`]+)`", cell))
            assert dict(loaded) == pairs, (path, dict(loaded), cell)
        elif doc.type in ("section", "list of sections") and cell in ("off", "none", "`{}`"):
            loaded = _loaded(bare, path.removesuffix("[]"))
            if loaded is _ABSENT:  # inside a section the bare config has not got: see the full one
                loaded = _loaded(full, path.rsplit(".", 1)[0])
                assert dataclasses.is_dataclass(loaded), path
                continue
            expected = {"off": None, "none": ()}.get(cell)
            assert dataclasses.is_dataclass(loaded) if cell == "`{}`" else loaded == expected, (path, loaded, cell)
        elif cell in ("none", "off", "any") or re.fullmatch(r"`[^`]*`", cell):
            loaded = _loaded(full, path)
            if loaded is _ABSENT:
                continue
            value = None if cell in ("none", "off", "any") else _documented_value(doc, cell.strip("`"))
            close = isinstance(value, float) and isinstance(loaded, float) and math.isclose(loaded, value)
            assert close or loaded == value, (path, loaded, cell)
        else:
            continue
        checked.append(path)
    return checked


def test_every_documented_default_is_what_a_config_without_the_key_gets(tmp_path: Path):
    checked = _defaults_checked(tmp_path)
    assert len(checked) >= 80  # the keys whose default is a value, not words such as "the upstream's name"
    assert "routes[].shadows[].timeout" in checked
    assert "upstreams.<name>.circuit.codes" in checked


def test_a_wrong_documented_default_would_be_caught(tmp_path: Path):
    original = CONFIGURATION.read_text(encoding="utf-8")
    wrong = original.replace(
        "| `routes[].shadows[].timeout` | duration, at least 1ms | `2s` |",
        "| `routes[].shadows[].timeout` | duration, at least 1ms | `3s` |",
    )
    assert wrong != original
    fake = tmp_path / "CONFIGURATION.md"
    fake.write_text(wrong, encoding="utf-8")
    with pytest.raises(AssertionError, match=r"routes\[\]\.shadows\[\]\.timeout"):
        _defaults_checked(tmp_path, fake)


RANGED = {path: doc for path, doc in SCHEMA.items() if doc.minimum is not None or doc.maximum is not None}
#: Keys another key must agree with: set alongside so that the boundary itself is valid.
COMPANIONS = {
    "routes[].promotion.window": {"min_samples": 1},
    "upstreams.<name>.circuit.max_ejection": {"ejection": "1ms"},
    "routes[].drift.persistence.m": {"n": 1000},  # m is at most n
    "routes[].drift.persistence.n": {"m": 1},
    "envoy_tap.batch": {"admin": "127.0.0.1:9901"},
    "envoy_tap.flush": {"admin": "127.0.0.1:9901"},
}
#: top-level keys a section's keys need beside them
TOP_COMPANIONS = {"envoy_tap": {"mode": "observer"}}


def _with(path: str, value: Any, tmp_path: Path) -> str:
    """The full config of ``SECTIONS`` with the key at ``path`` set to ``value``, as YAML."""
    document = yaml.safe_load(SECTIONS.format(capture=tmp_path / "caps"))
    *parents, leaf = path.split(".")
    node: Any = document
    for part in parents:
        name = part.removesuffix("[]")
        node = node["a"] if name == "<name>" else node.setdefault(name, {})
        if part.endswith("[]"):
            node = node[0]
    node[leaf] = value
    node.update(COMPANIONS.get(path, {}))
    document.update(TOP_COMPANIONS.get(path.split(".")[0], {}))
    return yaml.safe_dump(document)


def _written(doc: KeyDoc, value: float) -> Any:
    if doc.kind == "duration":
        return f"{value!r}s"
    return int(value) if doc.kind in ("integer", "size") else float(value)


@pytest.mark.parametrize("path", sorted(RANGED))
def test_every_documented_range_is_what_the_reader_enforces(path: str, tmp_path: Path):
    doc = RANGED[path]
    step = 1 if doc.kind in ("integer", "size") else None
    where = path.replace("[]", "[0]").replace("<name>", "a")
    file = str(tmp_path / "c.yaml")
    for bound, outside in ((doc.minimum, -1), (doc.maximum, +1)):
        if bound is None:
            continue
        parse_config(_with(path, _written(doc, bound), tmp_path), file)  # the bound itself is accepted
        beyond = bound + outside * (step or max(abs(bound) * 0.5, 1e-3))
        with pytest.raises(ConfigError) as caught:
            parse_config(_with(path, _written(doc, beyond), tmp_path), file)
        assert caught.value.key == where, (path, beyond, caught.value)


def test_the_example_config_parses():
    config = load_config(REPO / "examples" / "mlmirror.yaml")
    assert [route.name for route in config.routes] == ["iris", "ranker", "default"]


# --- metrics -------------------------------------------------------------------------------------------------------

METRICS = REPO / "docs" / "METRICS.md"
_CONSTRUCTOR = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"((?:mlmirror|process|python)_[a-z0-9_]+)\""
)


def _sample_name(name: str, kind: str) -> str:
    """The name a family is documented by: counters with ``_total``, info metrics with ``_info``."""
    if kind.lower().startswith("counter") and not name.endswith("_total"):
        return f"{name}_total"
    if kind.lower() == "info" and not name.endswith("_info"):
        return f"{name}_info"
    return name


def defined_metrics() -> set[str]:
    """Every metric family the source defines (proxy/metrics.py, the collectors, the worker group's)."""
    names = set()
    for path in (REPO / "proxy").rglob("*.py"):
        for kind, name in _CONSTRUCTOR.findall(path.read_text(encoding="utf-8")):
            names.add(_sample_name(name, kind))
    return names


def documented_metrics(file: Path = METRICS) -> set[str]:
    """Every metric name in the first cell of a table row of docs/METRICS.md."""
    names = set()
    for row in table_rows(file.read_text(encoding="utf-8")):
        names |= set(re.findall(r"`((?:mlmirror|process|python)_[a-z0-9_]+)`", row[0]))
    return names


async def scraped_metrics(tmp_path: Path) -> set[str]:
    """The families a live proxy exports with every feature on (``exposition_with_every_metric``)."""
    body = await exposition_with_every_metric(tmp_path)
    return {_sample_name(family.name, family.type) for family in text_string_to_metric_families(body)}


async def test_every_metric_the_code_exports_is_documented_and_every_documented_one_exists(tmp_path: Path):
    scraped = await scraped_metrics(tmp_path)
    defined = defined_metrics()
    documented = documented_metrics()
    assert len(defined) >= 70
    assert {"mlmirror_capture_disk_bytes", "mlmirror_drift_window_bins", "mlmirror_quality"} <= scraped
    assert sorted((scraped | defined) - documented) == [], "exported but not in docs/METRICS.md"
    assert sorted(documented - (scraped | defined)) == [], "in docs/METRICS.md but exported by nothing"


# --- admin endpoints -----------------------------------------------------------------------------------------------

ENDPOINTS_DOC = REPO / "docs" / "ENDPOINTS.md"


def documented_endpoints() -> set[tuple[str, str]]:
    """(method, path) of each row of the admin endpoint table, query strings left off."""
    rows = table_rows(ENDPOINTS_DOC.read_text(encoding="utf-8"))
    found = {re.fullmatch(r"`(GET|POST) (/[a-z]*)(?:\?\S*)?`", row[0]) for row in rows}
    return {(m.group(1), m.group(2)) for m in found if m is not None}


async def test_every_admin_endpoint_is_documented_and_every_documented_one_is_served():
    documented = documented_endpoints()
    assert documented == set(ENDPOINTS), "docs/ENDPOINTS.md and mlmirror.admin.endpoints.ENDPOINTS differ"
    async with (
        model_server("production") as production,
        through_proxy(f"upstreams: {{p: 127.0.0.1:{production}}}\nroutes: [{{match: {{}}, primary: p}}]\n") as (
            proxy,
            _,
        ),
    ):
        base = f"http://127.0.0.1:{proxy.admin_port}"
        answers = {
            (method, path): await asyncio.to_thread(http_get, base + path, method, b"" if method == "POST" else None)
            for method, path in sorted(documented)
        }
        unknown = await asyncio.to_thread(http_get, base + "/nonexistent")
    assert unknown[0] == 404  # what an endpoint the proxy does not serve would get
    for endpoint, (status, body) in answers.items():
        assert status not in (404, 405) or ("no such endpoint" not in body and "not allowed" not in body), endpoint


# --- the README ----------------------------------------------------------------------------------------------------

README = REPO / "README.md"


def test_the_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "run"], ["make", "test"]]


def test_every_yaml_example_in_the_readme_is_a_valid_config():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 3  # the quick start, a shadow, drift
    configs = [parse_config(block, "README.md") for block in blocks]
    assert any(route.shadows for config in configs for route in config.routes)
    assert any(route.drift is not None for config in configs for route in config.routes)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "docs/CONFIGURATION.md", "docs/METRICS.md", "docs/ENDPOINTS.md"])
def test_relative_links_lead_to_files_and_headings_that_exist(doc: str):
    source = REPO / doc
    links = re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8"))
    relative = [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]
    assert relative, doc
    for link in relative:
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        assert target.exists(), f"{doc}: {link}"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{doc}: {link}"


def test_every_module_path_the_readme_names_exists():
    named = set(re.findall(r"\b((?:proxy|kernels|protos|loadtest|tests|deploy|envoy)/[\w./-]*\w)", README.read_text()))
    assert len(named) >= 30
    assert sorted(path for path in named if not (REPO / path).exists()) == []


def _example_paths() -> set[str]:
    """The key paths examples/mlmirror.yaml holds, its commented-out keys (``# key: value``) included."""
    text = (REPO / "examples" / "mlmirror.yaml").read_text(encoding="utf-8")
    uncommented = re.sub(r"^(\s*)# (\s*)(\w+:)", r"\1\2\3", text, flags=re.MULTILINE)
    paths: set[str] = set()

    def walk(value: Any, path: str) -> None:
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    paths.add(f"{path}[]")
                    walk(item, f"{path}[]")
        elif isinstance(value, dict):
            for key, item in value.items():
                free = {
                    "upstreams": "<name>",
                    "method_types": "<method>",
                    "thresholds": "<method>",
                    "data_quality": "<check>",
                }
                name = free.get(path.rsplit(".", 1)[-1], key)
                child = f"{path}.{name}" if path else name
                paths.add(child)
                walk(item, child)

    walk(yaml.safe_load(uncommented), "")
    return paths


def test_the_example_config_shows_every_key():
    missing = sorted(set(SCHEMA) - _example_paths())
    assert missing == [], "keys examples/mlmirror.yaml does not show (as a value or a commented-out line)"

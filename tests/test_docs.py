"""The reference docs against the code: every configuration key in the schema is documented with the default a
config without it really gets, every documented key exists, and the example config parses. Metrics and endpoints
are in test_docs_metrics.py."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from mlmirror.config import Config, load_config, parse_config
from mlmirror.config.docs import BEGIN, END, reference, replace_reference
from mlmirror.config.keys import KeyDoc, schema_keys
from mlmirror.config.yamlsource import parse_duration, parse_yaml

from tests.support import REPO

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
    if doc.type == "duration":
        return parse_duration(text)
    if doc.type == "size":
        return parse_yaml(f"v: {text}", "docs").mapping(["v"])["v"].size(minimum=0)
    if doc.type == "list of gRPC status names":
        return frozenset(grpc.StatusCode[name] for name in yaml.safe_load(text))
    if doc.type == "number":
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
        "| `routes[].shadows[].timeout` | duration | `2s` |", "| `routes[].shadows[].timeout` | duration | `3s` |"
    )
    assert wrong != original
    fake = tmp_path / "CONFIGURATION.md"
    fake.write_text(wrong, encoding="utf-8")
    with pytest.raises(AssertionError, match=r"routes\[\]\.shadows\[\]\.timeout"):
        _defaults_checked(tmp_path, fake)


def test_the_example_config_parses():
    config = load_config(REPO / "examples" / "mlmirror.yaml")
    assert [route.name for route in config.routes] == ["iris", "ranker", "default"]

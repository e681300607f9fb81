"""Readers shared by the configuration's sections: a section's keys checked against the schema, choices, status
codes, and paths checked on disk with every failure a located ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml
from mlmirror.config.keys import value_kind, yaml_names
from mlmirror.config.yamlsource import Located

__all__ = [
    "Reader",
    "existing_file",
    "is_scalar",
    "one_of",
    "path_of",
    "probe",
    "read_section",
    "schema_reader",
    "shown",
    "status_codes",
]

Reader = Callable[[Located], Any]

_STATUS_BY_NAME = {code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}
#: Characters of a path shown in an error message (a fuzzer's 5,000-character path would drown the reason).
_SHOWN_PATH = 120


def read_section(
    node: Located, section: type, readers: Mapping[str, Reader] | None = None, required: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Located]]:
    """Read the mapping ``node`` as the schema dataclass ``section``: its keys are the section's YAML keys, each
    present one read by ``readers[key]`` when given, else as the schema declares it (``schema_reader``).

    Returns (values, located nodes), both keyed by the YAML key. Unknown keys and missing required ones are errors.
    """
    readers = readers or {}
    allowed = yaml_names(section)
    if not set(readers) <= set(allowed):  # a reader out of step with the schema: a bug, not a config error
        raise TypeError(f"readers of {section.__name__} {sorted(readers)} are not among its keys {sorted(allowed)}")
    keys = node.mapping(allowed, required)
    return {name: (readers.get(name) or schema_reader(section, name))(value) for name, value in keys.items()}, keys


@functools.cache
def schema_reader(section: type, name: str) -> Reader:
    """The reader of the key ``name`` of ``section`` that its schema declaration implies: its kind (duration, size,
    integer, choice ...) and range. Keys that need more (lists, sections, files, names of upstreams) have none."""
    f = next(f for f in dataclasses.fields(section) if (f.metadata.get("yaml") or f.name) == name)
    kind = value_kind(f, typing.get_type_hints(section)[f.name])
    low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
    if kind == "integer":
        return lambda n: n.integer(minimum=low, maximum=high)
    if kind == "number":
        low, high = (None if v is None else float(v) for v in (low, high))
        return lambda n: n.number(minimum=low, maximum=high)
    if kind == "duration" and high is None:
        return lambda n: n.duration(minimum=float(low or 0.0))
    if kind == "size" and high is None:
        return lambda n: n.size(minimum=int(low if low is not None else 1))
    if kind == "choice":
        choices, what = f.metadata["choices"], f.metadata.get("what") or name
        return lambda n: one_of(n, choices, what)
    plain: dict[str | None, Reader] = {
        "boolean": Located.boolean,
        "string": Located.string,
        "address": Located.address,
        "target": Located.target,
        "codes": status_codes,
    }
    if kind in plain:
        return plain[kind]
    raise TypeError(f"{section.__name__}.{name} ({kind}) needs a reader of its own")


def is_scalar(node: Located) -> bool:
    return isinstance(node.node, yaml.ScalarNode)


def one_of(node: Located, choices: tuple[str, ...], what: str) -> str:
    """A string among ``choices``; else an error naming ``what`` and the choices."""
    value = node.string()
    if value not in choices:
        raise node.error(f"unknown {what} {value!r} (one of {', '.join(choices)})")
    return value


def status_codes(node: Located) -> frozenset[grpc.StatusCode]:
    """A list of gRPC status names, in any case (``UNAVAILABLE``, ``deadline_exceeded``)."""
    codes = set()
    for item in node.sequence():
        name = item.string().upper()
        if name not in _STATUS_BY_NAME:
            raise item.error(f"unknown gRPC status code {name!r} (e.g. UNAVAILABLE, DEADLINE_EXCEEDED)")
        codes.add(_STATUS_BY_NAME[name])
    return frozenset(codes)


def shown(path: Path | str) -> str:
    """A path for an error message, cut to its first ``_SHOWN_PATH`` characters."""
    text = str(path)
    return text if len(text) <= _SHOWN_PATH else f"{text[:_SHOWN_PATH]}... ({len(text)} characters)"


def path_of(node: Located, base: Path) -> Path:
    """A path; a relative one is taken from ``base`` (the config file's directory)."""
    text = node.string()
    if "\0" in text:
        raise node.error("a path cannot contain a NUL character")
    path = Path(text)
    return path if path.is_absolute() else base / path


def probe(node: Located, path: Path, test: Callable[[Path], bool]) -> bool:
    """``test(path)`` (``Path.is_file``, ``Path.exists`` ...), with any OSError the system raises for the path
    itself (name too long, permission denied, too many symbolic links) a located error."""
    try:
        return test(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise node.error(f"cannot use the path {shown(path)}: {reason}") from None


def existing_file(node: Located, base: Path) -> str:
    """The path of a file that exists."""
    path = path_of(node, base)
    if not probe(node, path, Path.is_file):
        raise node.error(f"no such file: {shown(path)}")
    return str(path)

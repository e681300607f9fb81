"""What the schema says about each YAML key: declared with ``setting(...)`` on a dataclass field, listed by
``schema_keys()``.

A field declared ``timeout: float = setting(2.0, "cap on each copy", kind="duration")`` is an ordinary dataclass field
with that default; its metadata holds the key's description and how its type and default read in YAML.
``schema_keys(Config)`` walks the dataclasses from the root and yields one ``KeyDoc`` per YAML key, named by its
path in the document (``routes[].shadows[].percent``): this is what the readers accept and what
docs/CONFIGURATION.md lists.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["KeyDoc", "schema_keys", "setting", "show_default", "show_duration", "show_size", "value_kind", "yaml_names"]

#: Kinds of value a key may take, beyond those read from the field's annotation (int, float, bool, str).
KINDS = ("duration", "size", "address", "target", "file", "directory", "codes", "method")


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One documented YAML key.

    ``path``: where it sits in the document (``routes[].shadows[].percent``; ``<name>`` for a free-form key);
    ``type``: what it takes, in words; ``default``: its default as written in YAML (backquoted), ``required``, or
    words such as ``off``; ``description``: one line.
    """

    path: str
    type: str
    default: str
    description: str
    value: Any = None  # the default as the dataclass holds it (dataclasses.MISSING when required)
    kind: str | None = None  # what value_kind() says; None for lists, mappings and sections
    minimum: float | None = None
    maximum: float | None = None


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    kind: str | None = None,
    factory: Any = None,
    shown: str | None = None,
    yaml: str | None = None,
    each: str | None = None,
    choices: tuple[str, ...] | None = None,
    what: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    internal: bool = False,
) -> Any:
    """A dataclass field that is also a documented YAML key.

    ``kind``: one of ``KINDS`` when the annotation does not say it (a float that is a duration). ``factory``: a
    default_factory. ``shown``: the default in words when it is not a plain value (``the upstream's name``).
    ``yaml``: the key's name in YAML when it differs from the field's. ``each``: the placeholder of a mapping's
    free-form keys (``<method>``). ``choices``: the strings the key accepts, ``what``: how an error names them.
    ``minimum``, ``maximum``: the range a number, duration (seconds) or size (bytes) must lie in; the readers
    enforce it. ``internal``: not a YAML key (set by the reader, e.g. an upstream's name, its key in ``upstreams``).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    metadata = {"doc": doc, "kind": kind, "shown": shown, "yaml": yaml, "each": each, "choices": choices,
                "what": what, "minimum": minimum, "maximum": maximum, "internal": internal}  # fmt: skip
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def yaml_names(cls: type) -> tuple[str, ...]:
    """The YAML keys a section (a schema dataclass) accepts, in declaration order."""
    return tuple(_yaml_name(f) for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def _yaml_name(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml") or f.name


def schema_keys(cls: type, prefix: str = "") -> Iterator[KeyDoc]:
    """Every YAML key under the section ``cls``, depth first, each section before its keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path = f"{prefix}{_yaml_name(f)}"
        annotation = hints[f.name]
        section, container = _section(annotation)
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if container == "mapping" and section is not None:
            path = f"{path}.{f.metadata.get('each') or '<name>'}"
        elif container == "mapping":
            path = f"{path}.{f.metadata['each']}"
        elif container == "list" and section is not None:
            path = f"{path}[]"
        yield KeyDoc(
            path=path,
            type=_type(f, annotation, section, container),
            default=_default(f, value, section),
            description=f.metadata.get("doc", ""),
            value=value,
            kind=value_kind(f, annotation),
            minimum=f.metadata.get("minimum"),
            maximum=f.metadata.get("maximum"),
        )
        if section is not None:
            yield from schema_keys(section, f"{path}.")


def _section(annotation: Any) -> tuple[type | None, str | None]:
    """(the schema dataclass a field holds, ``mapping``/``list``/None for how it holds it)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union) and len(args) == 1:
        return _section(args[0])
    if origin is not None and issubclass(origin, Mapping):
        inner = args[1]
        return (inner if dataclasses.is_dataclass(inner) else None), "mapping"
    if origin in (tuple, frozenset) and args:
        inner = args[0]
        return (inner if dataclasses.is_dataclass(inner) else None), "list"
    if dataclasses.is_dataclass(annotation):
        return annotation, None
    return None, None


_PLAIN = {int: "integer", float: "number", bool: "boolean", str: "string"}


def value_kind(f: dataclasses.Field, annotation: Any) -> str | None:
    """What one value of the key is: a ``KINDS`` entry, ``choice``, or integer, number, boolean, string; None for a
    list, a mapping or a section (their readers are written by hand)."""
    kind = f.metadata.get("kind")
    section, container = _section(annotation)
    if kind is not None:
        return kind
    if section is not None or (container is not None and not f.metadata.get("choices")) or annotation is tuple:
        return None
    if f.metadata.get("choices"):
        return "choice"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (types.UnionType, typing.Union) else annotation
    return _PLAIN.get(base)


def _range(f: dataclasses.Field, kind: str | None) -> str:
    """``, 1 to 100``, ``, at least 1ms`` ...: the range of a key, as its type column ends."""
    low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
    show = {"duration": show_duration, "size": show_size}.get(kind or "", lambda v: show_default(float(v)))
    if low is not None and high is not None:
        return f", {show(low)} to {show(high)}"
    if low is not None:
        return f", at least {show(low)}"
    if high is not None:
        return f", at most {show(high)}"
    return ""


def _type(f: dataclasses.Field, annotation: Any, section: type | None, container: str | None) -> str:
    kind, choices = f.metadata.get("kind"), f.metadata.get("choices")
    if choices:
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    if section is not None:
        return {"mapping": "mapping of sections", "list": "list of sections"}.get(container or "", "section")
    if kind == "codes":
        return "list of gRPC status names"
    if kind is not None:
        return kind + _range(f, kind)
    if container == "list":
        inner = typing.get_args(annotation)[:1]
        return {(int,): "list of integers", (str,): "list of strings"}.get(inner, "list of values")
    if annotation is tuple:
        return "list of values"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if container == "mapping":
        return _PLAIN.get(args[1], "string") + _range(f, None)
    base = args[0] if typing.get_origin(annotation) in (types.UnionType, typing.Union) else annotation
    return _PLAIN.get(base, "string") + _range(f, None)


def _default(f: dataclasses.Field, value: Any, section: type | None) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "off" if section is not None else "none"
    if section is not None:
        return "`{}`"
    return f"`{show_default(value, f.metadata.get('kind'))}`"


def show_default(value: Any, kind: str | None = None) -> str:
    """A default as it would be written in the YAML file."""
    if kind == "duration":
        return show_duration(value)
    if kind == "size":
        return show_size(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset):  # status codes
        return "[" + ", ".join(_code_names(value)) + "]"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show_default(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 0.0001 -> 1e-4
        mantissa, _, exponent = f"{value:e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if value == "":
        return '""'
    return str(value)


def _code_names(codes: frozenset[grpc.StatusCode]) -> list[str]:
    """Status names, the default fallback codes first in the order the docs always gave them, then the rest."""
    order = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED]
    return [c.name for c in order if c in codes] + sorted(c.name for c in codes if c not in order)


_DURATION_UNITS = (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
_SIZE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def show_duration(seconds: float) -> str:
    """Seconds as the shortest whole-numbered duration: 3600.0 -> ``1h``, 0.05 -> ``50ms``, 1.5 -> ``1500ms``."""
    for unit, scale in _DURATION_UNITS:
        count = seconds / scale
        if count >= 1 and math.isclose(count, round(count), abs_tol=1e-9):
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


def show_size(size: int) -> str:
    """Bytes with the largest binary unit that divides them: 4194304 -> ``4MiB``."""
    for unit, scale in _SIZE_UNITS:
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)

"""YAML values that remember where they came from, so every config error names file, line and key.

``parse_yaml`` composes a document into PyYAML nodes (safe: no Python object tags are ever constructed) and wraps
the root in ``Located``; typed readers (``string``, ``duration``, ``mapping`` ...) validate a value and raise
``ConfigError`` pointing at it.

Hostile documents are bounded: nesting deeper than Python's recursion limit, aliases that refer to themselves, and
aliases that would expand the document by more than ``MAX_ALIAS_EXPANSION`` nodes (a "billion laughs" document: the
config readers walk the expanded tree) are ``ConfigError``s, as is any scalar a YAML tag cannot build.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import yaml.constructor
from mlmirror.errors import ConfigError

__all__ = ["MAX_ALIAS_EXPANSION", "MAX_DURATION", "Located", "parse_duration", "parse_yaml", "read_yaml_text"]

#: Nodes that aliases may add to a document, beyond those written in it.
MAX_ALIAS_EXPANSION = 10_000
#: Longest duration, in seconds (a year): gRPC treats timeouts beyond ~300 years as already expired.
MAX_DURATION = 365 * 86400.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s|m|h)\s*$")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]*):(\d{1,5})$")
_TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")


def parse_duration(text: object) -> float | None:
    """Seconds in a duration such as ``250ms``, ``2s``, ``1.5m`` or ``1h``; None when it is not one."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    return None if match is None else float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def read_yaml_text(path: str | Path, what: str = "file") -> str:
    """The text of the YAML file at ``path``; a missing or unreadable file raises ``ConfigError`` naming it."""
    file = str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such {what}", file=file) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=file) from None


def parse_yaml(text: str, file: str) -> Located:
    """Compose ``text`` into a located root node; YAML syntax errors become ``ConfigError`` with the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=file) from None
    if node is None:  # an empty document: an empty mapping on line 1 (errors about it need a line)
        start = yaml.error.Mark(file, 0, 0, 0, None, 0)
        node = yaml.MappingNode("tag:yaml.org,2002:map", [], start_mark=start, end_mark=start)
    _check_aliases(node, file)
    return Located(file=file, key="", node=node)


def _check_aliases(root: yaml.Node, file: str) -> None:
    """Refuse aliases that refer to an enclosing node, or that expand the document by more than
    ``MAX_ALIAS_EXPANSION`` nodes. Counts without expanding: each distinct node is visited once."""
    sizes: dict[int, int] = {}  # id(node) -> nodes in its expanded subtree
    open_nodes: set[int] = set()  # the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                line = child.start_mark.line + 1
                raise ConfigError("invalid YAML: an alias refers to a node that contains it", file=file, line=line)
            if id(child) not in sizes:
                stack.append((child, False))
    added = sizes[id(root)] - len(sizes)
    if added > MAX_ALIAS_EXPANSION:
        raise ConfigError(
            f"invalid YAML: aliases expand the document by {added} nodes (at most {MAX_ALIAS_EXPANSION})", file=file
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


@dataclass(frozen=True, slots=True)
class Located:
    """One YAML node, its dotted key path in the document and the file it came from."""

    file: str
    key: str
    node: yaml.Node

    @property
    def line(self) -> int:
        """1-based line where the node starts."""
        return self.node.start_mark.line + 1

    def error(self, reason: str) -> ConfigError:
        return ConfigError(reason, file=self.file, line=self.line, key=self.key or None)

    def child_key(self, name: str | int) -> str:
        if isinstance(name, int):
            return f"{self.key}[{name}]"
        return f"{self.key}.{name}" if self.key else name

    # --- containers -------------------------------------------------------------------------------------------

    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"

    def mapping(self, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Located]:
        """Read a mapping with string keys; reject unknown and duplicate keys, require ``required`` ones."""
        if self.is_null():
            items: dict[str, Located] = {}
        elif not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {_kind(self.node)}")
        else:
            items = self._mapping_items()
        allowed = tuple(allowed)
        for name, value in items.items():
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (allowed: {', '.join(allowed)})"
                raise ConfigError(f"unknown key{suffix}", file=self.file, line=value.line, key=value.key)
        for name in required:
            if name not in items:
                raise self.error(f"missing required key '{name}'")
        return items

    def dictionary(self) -> dict[str, Located]:
        """Read a mapping whose keys are free-form names (upstream names, method names)."""
        if self.is_null():
            return {}
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {_kind(self.node)}")
        return self._mapping_items()

    def _mapping_items(self) -> dict[str, Located]:
        assert isinstance(self.node, yaml.MappingNode)
        try:
            yaml.constructor.SafeConstructor().flatten_mapping(self.node)
        except yaml.constructor.ConstructorError as exc:
            raise self.error(f"bad merge key (<<): {exc.problem}") from None
        items: dict[str, Located] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(
                    "mapping keys must be plain strings",
                    file=self.file,
                    line=key_node.start_mark.line + 1,
                    key=self.key or None,
                )
            name = str(key_node.value)
            child = Located(self.file, self.child_key(name), value_node)
            if name in items:
                raise ConfigError(
                    f"duplicate key (first given on line {items[name].line})",
                    file=self.file,
                    line=key_node.start_mark.line + 1,
                    key=child.key,
                )
            items[name] = child
        return items

    def sequence(self) -> list[Located]:
        if self.is_null():
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {_kind(self.node)}")
        return [Located(self.file, self.child_key(i), item) for i, item in enumerate(self.node.value)]

    # --- scalars ----------------------------------------------------------------------------------------------

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {_kind(self.node)}")
        try:
            return yaml.constructor.SafeConstructor().construct_object(self.node)
        except yaml.constructor.ConstructorError as exc:
            raise self.error(f"cannot read value: {exc.problem}") from None
        except (ValueError, KeyError, OverflowError) as exc:  # a tag's constructor on a value it cannot build
            raise self.error(f"cannot read value {self.node.value[:80]!r} as {self.node.tag}: {exc}") from None

    def string(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value:
            raise self.error(f"expected a non-empty string, got {value!r}")
        return value

    def boolean(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {value!r}")
        return value

    def integer(self, *, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}")
        return self._in_range(value, minimum, maximum)

    def number(self, *, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(f"expected a finite number, got {value!r}")
        return self._in_range(float(value), minimum, maximum)

    def _in_range(self, value: Any, minimum: Any, maximum: Any) -> Any:
        if minimum is not None and value < minimum:
            raise self.error(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be <= {maximum}, got {value}")
        return value

    def duration(self, *, minimum: float = 0.0) -> float:
        """A duration such as ``250ms``, ``2s``, ``1.5m`` or ``1h``, in seconds. A unit is required; at most
        ``MAX_DURATION``."""
        value = self.scalar()
        seconds = parse_duration(value)
        if seconds is None:
            raise self.error(f"bad duration {value!r}: give a number and a unit (us, ms, s, m, h), e.g. 2s or 150ms")
        if seconds < minimum:
            raise self.error(f"duration must be at least {minimum}s, got {value!r}")
        if not seconds <= MAX_DURATION:
            raise self.error(f"duration must be at most a year ({MAX_DURATION:g}s), got {value!r}")
        return seconds

    def size(self, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
        """A size in bytes: an integer, or a number with a unit such as ``512KiB``, ``4MiB``, ``1MB``."""
        value = self.scalar()
        match = _SIZE.match(str(value)) if isinstance(value, str | int) and not isinstance(value, bool) else None
        if match is None:
            raise self.error(f"bad size {value!r}: give bytes or a number with a unit (KiB, MiB, GiB, KB, MB, GB)")
        return self._in_range(int(match.group(1)) * _SIZE_UNITS[match.group(2)], minimum, maximum)

    def address(self) -> str:
        """A ``host:port`` address (host may be empty, a name, IPv4, or ``[IPv6]``)."""
        value = self.string()
        match = _ADDRESS.match(value)
        if match is None or not 0 <= int(match.group(2)) <= 65535:
            raise self.error(f"bad address {value!r}: expected host:port, e.g. 127.0.0.1:9001 or [::1]:9001")
        return value

    def target(self) -> str:
        """A gRPC channel target: ``host:port``, or a URI with scheme dns, unix, unix-abstract, ipv4 or ipv6
        (``dns:///models.internal:9000``, ``unix:///run/model.sock``)."""
        value = self.string()
        if value.startswith(_TARGET_SCHEMES):
            return value
        return self.address()


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"

"""Reading a configuration: YAML in, the schema's frozen dataclasses out, every check done with the file, line and
key at fault (``file:line: key: reason``).

``load_config(path)`` reads a file, ``parse_config(text, file)`` a string. Durations take a unit (``2s``,
``150ms``), sizes may (``4MiB``). This module reads the top level and the upstreams; routes are read by
``mlmirror.config.read_route``, their observers by ``mlmirror.config.read_observers``. docs/CONFIGURATION.md lists
every key; ``examples/mlmirror.yaml`` shows them in use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

from mlmirror.config.addresses import is_loopback
from mlmirror.config.keys import yaml_names
from mlmirror.config.read_route import check_routes, read_route
from mlmirror.config.schema import (
    CALL_TYPES,
    OBSERVER_LISTEN,
    CircuitPolicy,
    Config,
    EnvoyTap,
    Feedback,
    HealthCheck,
    Keepalive,
    Observer,
    TlsClient,
    TlsServer,
    Upstream,
)
from mlmirror.config.values import Reader, existing_file, is_scalar, read_section, schema_reader, shown
from mlmirror.config.yamlsource import Located, parse_yaml, read_yaml_text

__all__ = ["load_config", "parse_config"]


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML configuration file."""
    return parse_config(read_yaml_text(path), str(path))


def parse_config(text: str, file: str = "<string>") -> Config:
    """Validate a YAML configuration given as text; ``file`` names it in errors (and relative paths in it are taken
    from its directory; from the working directory for ``<string>``)."""
    root = parse_yaml(text, file)
    base = Path(file).parent if file != "<string>" else Path.cwd()
    shed_lag = schema_reader(Config, "mirror_shed_lag")
    readers: dict[str, Reader] = {  # the other keys are read as the schema declares them
        "admin": _admin_address,
        "admin_token_file": lambda n: _token_file(n, base, "admin token file"),
        "feedback": lambda n: _feedback(n, base),
        "mirror_shed_lag": lambda n: None if n.is_null() or n.scalar() in (False, "off") else shed_lag(n),
        "tls": lambda n: _tls_server(n, base),
        "observer": _observer,
        "envoy_tap": _envoy_tap,
        "method_types": lambda n: MappingProxyType(_method_types(n)),
        "upstreams": lambda n: MappingProxyType(_upstreams(n, base)),
        "routes": lambda n: n,  # read below, once the upstreams are known
    }
    values, keys = read_section(root, Config, readers, required=("upstreams", "routes"))
    if values.get("mode") == "observer" and "listen" not in keys:
        values["listen"] = OBSERVER_LISTEN  # Envoy runs beside it; a networked Envoy needs listen and mTLS
    _check_feedback(values, keys)
    if values.get("envoy_tap") is not None and values.get("mode") != "observer":
        raise keys["envoy_tap"].error("envoy_tap reads calls Envoy carries: it needs mode: observer")
    upstreams = values["upstreams"]
    routes = tuple(read_route(i, node, upstreams, base) for i, node in enumerate(keys["routes"].sequence()))
    if not routes:
        raise keys["routes"].error("at least one route is required")
    check_routes(routes, keys["routes"])
    return Config(source=file, **{**values, "routes": routes})


def _token_file(node: Located, base: Path, what: str) -> str:
    """A file holding a bearer token (read at start, stripped); it must exist and not be empty."""
    path = existing_file(node, base)
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise node.error(f"cannot read the {what} {shown(path)}: {exc}") from None
    if not token:
        raise node.error(f"the {what} {shown(path)} is empty")
    return path


def _feedback(node: Located, base: Path) -> Feedback:
    def clients(n: Located) -> tuple[str, ...]:
        names = tuple(item.string() for item in n.sequence())
        if any(not name.strip() for name in names):
            raise n.error("a client certificate name cannot be empty")
        return names

    readers: dict[str, Reader] = {"token_file": lambda n: _token_file(n, base, "feedback token file"),
                                  "clients": clients}  # fmt: skip
    values, keys = read_section(node, Feedback, readers)
    feedback = Feedback(**values)
    if feedback.listen is not None and not is_loopback(feedback.listen) and feedback.token_file is None:
        raise keys["listen"].error(
            f"{feedback.listen} is not loopback: Feedback there needs a credential (set feedback.token_file), or "
            "listen on 127.0.0.1"
        )
    return feedback


def _check_feedback(values: dict, keys: dict[str, Located]) -> None:
    """``feedback.clients`` names client certificates: the listener must ask for them (``tls.client_ca``)."""
    feedback, tls = values.get("feedback"), values.get("tls")
    if feedback is not None and feedback.clients and (tls is None or tls.client_ca is None):
        clients = keys["feedback"].dictionary()["clients"]
        raise clients.error("feedback.clients names client certificates, but the listener asks for none: set "
                            "tls.client_ca (mTLS)")  # fmt: skip


def _observer(node: Located) -> Observer:
    def or_off(key: str) -> Callable[[Located], float | None]:
        limit = schema_reader(Observer, key)
        return lambda n: None if n.is_null() or n.scalar() in (False, "off") else limit(n)

    off = {key: or_off(key) for key in ("cpu_pressure_limit", "cpu_limit", "serving_idle")}
    return Observer(**read_section(node, Observer, off)[0])


def _envoy_tap(node: Located) -> EnvoyTap:
    values, keys = read_section(node, EnvoyTap, required=("admin",))
    if "method" in values:
        parts = values["method"].split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
            raise keys["method"].error("method must be a full gRPC method name such as /pkg.Service/Method")
    if "config_id" in values and not values["config_id"].strip():
        raise keys["config_id"].error("config_id cannot be empty")
    return EnvoyTap(**values)


def _admin_address(node: Located) -> str | None:
    """The admin address; ``off``, ``false`` or null disable the admin endpoint."""
    if node.is_null() or node.scalar() in (False, "off"):
        return None
    return node.address()


def _method_types(node: Located) -> dict[str, str]:
    types = {}
    for method, item in node.dictionary().items():
        parts = method.split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or "*" in method:
            raise item.error("method_types keys must be full method names such as /pkg.Service/Method")
        kind = item.string()
        if kind not in CALL_TYPES:
            raise item.error(f"unknown call type {kind!r} (one of {', '.join(CALL_TYPES)})")
        types[method] = kind
    return types


def _upstreams(node: Located, base: Path) -> dict[str, Upstream]:
    upstreams = {name: _upstream(name, item, base) for name, item in node.dictionary().items()}
    if not upstreams:
        raise node.error("at least one upstream is required")
    return upstreams


def _upstream(name: str, node: Located, base: Path) -> Upstream:
    if is_scalar(node) and not node.is_null():
        # Shorthand: `name: host:port`.
        return Upstream(name=name, address=node.target())
    readers: dict[str, Reader] = {
        "keepalive": lambda n: Keepalive(**read_section(n, Keepalive)[0]),
        "tls": lambda n: _tls_client(n, base),
        "circuit": _circuit,
        "health_check": _health_check,
    }
    values, _ = read_section(node, Upstream, readers, required=("address",))
    return Upstream(name=name, **values)


def _circuit(node: Located) -> CircuitPolicy:
    values, keys = read_section(node, CircuitPolicy)
    policy = CircuitPolicy(**values)
    if policy.max_ejection < policy.ejection:
        raise keys.get("max_ejection", node).error(
            f"max_ejection ({policy.max_ejection:g}s) must be at least ejection ({policy.ejection:g}s)"
        )
    return policy


def _health_check(node: Located) -> HealthCheck:
    values, _ = read_section(node, HealthCheck, {"service": lambda n: "" if n.is_null() else str(n.scalar())})
    return HealthCheck(**values)


def _tls_client(node: Located, base: Path) -> TlsClient:
    def file(n: Located) -> str:
        return existing_file(n, base)

    given = node.mapping(yaml_names(TlsClient))
    if ("cert" in given) != ("key" in given):
        raise node.error("cert and key go together (client certificate for mTLS)")
    values, _ = read_section(node, TlsClient, {"ca": file, "cert": file, "key": file})
    return TlsClient(**values)


def _tls_server(node: Located, base: Path) -> TlsServer:
    def file(n: Located) -> str:
        return existing_file(n, base)

    values, _ = read_section(node, TlsServer, {"cert": file, "key": file, "client_ca": file}, required=("cert", "key"))
    return TlsServer(**values)

"""Reading ``routes[]``: match, chain, static default, shadows, comparison and promotion; then the checks across
routes (unique names, capture directories of their own, no route hidden by an earlier one). A route's drift,
capture and redaction are read by ``mlmirror.config.read_observers``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from mlmirror.config.addresses import split_address
from mlmirror.config.keys import yaml_names
from mlmirror.config.read_observers import read_capture, read_drift, read_redact
from mlmirror.config.schema import (
    CREDENTIAL_METADATA,
    DEFAULT_FALLBACK_CODES,
    Compare,
    Promotion,
    Route,
    RouteMatch,
    Shadow,
    StaticResponse,
    StaticTensor,
    Upstream,
)
from mlmirror.config.values import is_scalar, read_section, status_codes
from mlmirror.config.yamlsource import Located
from mlmirror.protocol.codec import DATATYPES, to_numpy

__all__ = ["check_routes", "read_route"]

_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def read_route(index: int, node: Located, upstreams: Mapping[str, Upstream], base: Path) -> Route:
    """``routes[index]``; its upstream names must be among ``upstreams``, its paths are taken from ``base``."""
    keys = node.mapping(yaml_names(Route), required=("match", "primary"))
    match_values, _ = read_section(keys["match"], RouteMatch, {"method": _method_pattern})
    match = RouteMatch(**match_values)

    def known(item: Located) -> str:
        name = item.string()
        if name not in upstreams:
            raise item.error(f"unknown upstream {name!r} (defined: {', '.join(sorted(upstreams))})")
        return name

    primary = known(keys["primary"])
    fallback_node = keys.get("fallback")
    fallback: list[str] = []
    if fallback_node is not None:
        single = is_scalar(fallback_node) and not fallback_node.is_null()
        items = [fallback_node] if single else fallback_node.sequence()
        for item in items:
            name = known(item)
            if name == primary or name in fallback:
                raise item.error(f"upstream {name!r} is already in this route's chain")
            fallback.append(name)
    return Route(
        name=keys["name"].string() if "name" in keys else _default_route_name(index, match),
        match=match,
        primary=primary,
        fallback=tuple(fallback),
        fallback_on=status_codes(keys["fallback_on"]) if "fallback_on" in keys else DEFAULT_FALLBACK_CODES,
        static_response=_static_response(keys["static_response"]) if "static_response" in keys else None,
        shadows=_shadows(keys["shadows"], known, primary, upstreams) if "shadows" in keys else (),
        compare=_compare(keys["compare"]) if "compare" in keys else Compare(),
        promotion=_promotion(keys["promotion"]) if "promotion" in keys else Promotion(),
        drift=read_drift(keys["drift"], base) if "drift" in keys else None,
        capture=read_capture(keys["capture"], base) if "capture" in keys else None,
        redact=read_redact(keys["redact"], match) if "redact" in keys else (),
    )


def _method_pattern(node: Located) -> str:
    """A route's method match: ``/pkg.Service/Method`` or ``/pkg.Service/*``."""
    method = node.string()
    parts = method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or ("*" in method and parts[2] != "*"):
        raise node.error(f"bad method {method!r}: expected /pkg.Service/Method or /pkg.Service/*")
    return method


def _default_route_name(index: int, match: RouteMatch) -> str:
    if match.is_catch_all:
        return "default"
    if match.model is not None:
        return match.model
    return f"route{index}"


def _shadows(
    node: Located, known: Callable[[Located], str], primary: str, upstreams: Mapping[str, Upstream]
) -> tuple[Shadow, ...]:
    shadows: list[Shadow] = []
    for item in node.sequence():
        readers = {"upstream": known, "strip_metadata": _metadata_keys, "forward_metadata": _metadata_keys}
        values, keys = read_section(item, Shadow, readers, required=("upstream",))
        shadow = Shadow(**{"name": values["upstream"], **values})
        _check_forwarded(shadow, keys)
        if shadow.upstream == primary:
            raise keys["upstream"].error(f"upstream {primary!r} is this route's primary; a shadow must be another")
        if any(other.name == shadow.name for other in shadows):
            raise keys.get("name", item).error(f"shadow name {shadow.name!r} is used twice in this route; set name:")
        if shadow.control and any(other.control for other in shadows):
            raise keys["control"].error("a route has at most one control shadow")
        address = upstreams[shadow.upstream].address
        if shadow.transport == "h2" and split_address(address) is None:
            raise keys["transport"].error(
                f"transport h2 reaches one host (host:port, dns:///, one ipv4:/ipv6: address, unix:), not "
                f"{address!r}: use auto or grpc"
            )
        shadows.append(shadow)
    return tuple(shadows)


def _metadata_keys(node: Located) -> tuple[str, ...]:
    """A list of request metadata keys (header names), lower-cased as gRPC sends them."""
    keys: list[str] = []
    for item in node.sequence():
        key = item.string().lower()
        if not _METADATA_KEY.fullmatch(key):
            raise item.error(f"bad metadata key {key!r}: a header name of letters, digits, '-', '_' and '.'")
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _check_forwarded(shadow: Shadow, keys: Mapping[str, Located]) -> None:
    """``forward_metadata`` only allows back what would be dropped, and contradicts no ``strip_metadata`` entry."""
    for i, key in enumerate(shadow.forward_metadata):
        item = keys["forward_metadata"].sequence()[i]
        if key in shadow.strip_metadata:
            raise item.error(f"{key!r} is also in strip_metadata: a copy cannot both drop and carry it")
        if key not in CREDENTIAL_METADATA:
            raise item.error(
                f"{key!r} is not dropped, so there is nothing to allow back: copies carry every header but "
                f"{', '.join(CREDENTIAL_METADATA)} and strip_metadata's"
            )


def _compare(node: Located) -> Compare:
    return Compare(**read_section(node, Compare)[0])


def _promotion(node: Located) -> Promotion:
    values, keys = read_section(node, Promotion)
    promotion = Promotion(**values)
    if promotion.min_samples > promotion.window:
        raise keys.get("min_samples", keys.get("window", node)).error(
            f"min_samples ({promotion.min_samples}) exceeds window ({promotion.window}): never promotable"
        )
    return promotion


def _static_response(node: Located) -> StaticResponse:
    keys = node.mapping(yaml_names(StaticResponse), required=("outputs",))
    outputs = []
    for item in keys["outputs"].sequence():
        t = item.mapping(yaml_names(StaticTensor), required=yaml_names(StaticTensor))
        datatype = t["datatype"].string().upper()
        if datatype not in DATATYPES:
            raise t["datatype"].error(f"unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
        shape = tuple(dim.integer(minimum=-1) for dim in t["shape"].sequence())
        if not shape or any(d == 0 or (d == -1 and i > 0) for i, d in enumerate(shape)):
            raise t["shape"].error("shape needs positive dimensions; only the first may be -1 (the batch size)")
        values = [v.scalar() for v in t["data"].sequence()]
        expected = math.prod(abs(d) for d in shape)
        if len(values) != expected:
            raise t["data"].error(f"{len(values)} values given, shape {list(shape)} needs {expected}")
        try:
            to_numpy(datatype, values)
        except ValueError as exc:
            raise t["data"].error(str(exc)) from None
        outputs.append(StaticTensor(name=t["name"].string(), datatype=datatype, shape=shape, values=tuple(values)))
    if not outputs:
        raise keys["outputs"].error("at least one output tensor is required")
    if "model_version" in keys:
        return StaticResponse(model_version=keys["model_version"].string(), outputs=tuple(outputs))
    return StaticResponse(outputs=tuple(outputs))


def check_routes(routes: tuple[Route, ...], node: Located) -> None:
    """Checks across the routes read from ``node`` (the ``routes`` list)."""
    items = node.sequence()
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name in seen:
            raise items[i].error(
                f"route name {route.name!r} is used twice (also routes[{seen[route.name]}]); set name:"
            )
        seen[route.name] = i
        capture = route.capture
        other = next((r for r in routes[:i] if capture and r.capture and r.capture.path == capture.path), None)
        if capture is not None and other is not None:
            path = items[i].dictionary()["capture"].dictionary()["path"]
            raise path.error(f"capture directory {capture.path} is also route {other.name}'s: each needs its own")
        for j in range(i):
            if routes[j].match.covers(route.match):
                raise items[i].error(
                    f"this route can never match: routes[{j}] ({routes[j].name}) above takes its calls"
                )

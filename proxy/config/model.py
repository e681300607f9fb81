"""The configuration: YAML in, frozen dataclasses out, every check done here with the file, line and key at fault.

``load_config(path)`` reads a file, ``parse_config(text, file)`` a string. Durations take a unit (``2s``, ``150ms``),
sizes may (``4MiB``). The README documents every key; ``examples/mlmirror.yaml`` shows them in use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import yaml
from mlmirror.config.yamlsource import Located, parse_yaml
from mlmirror.errors import ConfigError
from mlmirror.protocol.codec import DATATYPES, to_numpy

__all__ = [
    "CALL_TYPES",
    "DEFAULT_FALLBACK_CODES",
    "CLASSIFICATION_MODES",
    "Attribution",
    "CAPTURE_INCLUDE",
    "Capture",
    "DEMOTE_TO",
    "DRIFT_METHODS",
    "MODES",
    "CircuitPolicy",
    "Compare",
    "Config",
    "Drift",
    "DriftFeature",
    "GroundTruth",
    "HealthCheck",
    "Keepalive",
    "Multivariate",
    "Observer",
    "Promotion",
    "Route",
    "RouteMatch",
    "Shadow",
    "StaticResponse",
    "StaticTensor",
    "TlsClient",
    "TlsServer",
    "Upstream",
    "load_config",
    "parse_config",
]

CALL_TYPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
DEFAULT_FALLBACK_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
_STATUS_BY_NAME = {code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}
_HEALTH_CHECK_KINDS = ("connect", "grpc", "kserve")
CLASSIFICATION_MODES = ("none", "argmax", "label")
CAPTURE_INCLUDE = ("request", "response", "both")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
DEMOTE_TO = ("shadow", "fallback", "none")
MODES = ("proxy", "observer")
#: Drift methods and their default thresholds: a feature drifts when the score is above it (below it for ``ks``
#: and ``chi2``, whose scores are p-values).
DRIFT_METHODS = {"ks": 0.01, "chi2": 0.01, "psi": 0.2, "js": 0.1, "hellinger": 0.1, "linf": 0.1, "kl": 0.1, "w1": 0.1}


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClient:
    """TLS from the proxy to an upstream. Paths to PEM files; all optional (system roots when ``ca`` is unset)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsServer:
    """TLS on the listener; ``client_ca`` set means clients must present a certificate it signed (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Keepalive:
    """HTTP/2 keepalive pings to an upstream: ping after ``time`` seconds idle, fail after ``timeout`` seconds."""

    time: float = 30.0
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitPolicy:
    """Per-upstream circuit breaker.

    ``failures`` consecutive failed calls (status in ``codes``) open the circuit for
    ``min(ejection * 2**(n-1), max_ejection)`` seconds at the n-th ejection, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``; then one probe call is let through (half-open).
    """

    failures: int = 5
    ejection: float = 5.0
    max_ejection: float = 60.0
    jitter: float = 0.1
    codes: frozenset[grpc.StatusCode] = DEFAULT_FALLBACK_CODES


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """How the proxy decides an upstream is reachable, every ``interval`` seconds.

    type: ``connect`` (an HTTP/2 connection comes up), ``grpc`` (grpc.health.v1 Check of ``service`` says
    SERVING) or ``kserve`` (ServerReady, or ModelReady of ``service`` when set, says ready).
    """

    type: str = "connect"
    interval: float = 5.0
    timeout: float = 1.0
    service: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A named target: one gRPC channel. ``timeout`` (seconds) caps each call to it; None: the client's deadline."""

    name: str
    address: str
    timeout: float | None = None
    keepalive: Keepalive = field(default_factory=Keepalive)
    tls: TlsClient | None = None
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    health_check: HealthCheck = field(default_factory=HealthCheck)


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticTensor:
    """One output tensor of a static default response. A leading shape of -1 takes the request's batch size."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: tuple = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticResponse:
    """The ModelInfer answer given when the whole fallback chain failed."""

    model_version: str = "static-default"
    outputs: tuple[StaticTensor, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """Which calls a route takes. ``method``: exact ``/pkg.Service/Method`` or ``/pkg.Service/*``; ``model``: the
    KServe model name (ModelInfer, ModelReady, ModelMetadata). Unset fields match anything."""

    method: str | None = None
    model: str | None = None

    @property
    def is_catch_all(self) -> bool:
        return self.method is None and self.model is None


@dataclass(frozen=True, slots=True, kw_only=True)
class Shadow:
    """An upstream that gets a fire-and-forget copy of a route's sampled unary calls.

    ``percent`` (0-100) of calls are mirrored, chosen by a hash of the request id (the same calls for every shadow
    at the same percent). At most ``max_inflight`` copies are in flight and ``queue_size`` wait; beyond that, and for
    requests over ``max_message_size`` bytes, copies are dropped and counted. ``timeout`` (seconds) caps each copy.
    A ``control`` shadow is a second instance of the production model: its disagreement with production is the
    noise baseline other shadows are judged against.
    """

    name: str
    upstream: str
    percent: float = 100.0
    timeout: float = 2.0
    max_inflight: int = 32
    queue_size: int = 256
    max_message_size: int = 4 * 2**20
    control: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare:
    """How a shadow's answer is compared with production's.

    Numbers match when ``|shadow - production| <= atol + rtol * |production|`` (NaN matches NaN). ``classification``
    picks what "agreement" means: ``none`` — a call agrees when every production output is matched; ``argmax`` —
    each row of ``output`` (the first output when unset) agrees when its argmax over the last axes is the same;
    ``label`` — each element of ``output`` agrees when equal.
    """

    atol: float = 1e-6
    rtol: float = 1e-4
    classification: str = "none"
    output: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Promotion:
    """When a shadow is ready to replace the primary, judged over its last ``window`` mirrored calls.

    Promotable when the window holds at least ``min_samples`` agreement samples, the Wilson lower bound of the
    agreement ratio (at ``confidence``) plus the control's disagreement (noise) is at least ``agreement``, the
    shadow's error ratio is at most production's plus ``error_margin``, and the shadow's p99 latency is at most
    ``latency_factor`` times production's. ``demote_to``: what the old primary becomes when a shadow is promoted.
    """

    window: int = 1000
    min_samples: int = 200
    agreement: float = 0.98
    confidence: float = 0.95
    error_margin: float = 0.01
    latency_factor: float = 1.5
    demote_to: str = "shadow"


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftFeature:
    """One monitored feature: column ``column`` of input tensor ``input`` (all of a 1-column tensor when None).
    ``categorical``: values are categories (BYTES tensors always are)."""

    name: str
    input: str
    column: int | None = None
    categorical: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GroundTruth:
    """Joining predictions with outcomes reported later (``ReportOutcome``).

    ``output``: the output tensor holding the prediction (classification: argmax of a [n, k] tensor, or the label of
    a [n] one; regression: the value). Predictions wait at most ``ttl`` seconds and ``max_pending`` at a time;
    quality is computed per model version every ``window`` outcome rows.
    """

    output: str
    task: str = "classification"
    ttl: float = 3600.0
    max_pending: int = 20_000
    window: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Attribution:
    """Feature-attribution drift: importances from the attribution ``output`` tensor (one column per numeric
    feature), or from a linear surrogate of the ``target`` output series (default: the first numeric output
    series); flagged when the NDCG against the reference's ranking is below ``threshold``."""

    output: str | None = None
    target: str | None = None
    threshold: float = 0.9


@dataclass(frozen=True, slots=True, kw_only=True)
class Multivariate:
    """PCA reconstruction error of the numeric features: components explaining ``variance`` of the reference's
    standardized variance; flagged above the reference chunks' mean + ``k`` standard deviations."""

    variance: float = 0.65
    k: float = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    """A route's drift monitoring: which inputs and outputs, how they are binned, windowed and judged.

    A window (per model version) closes after ``window`` calls or ``window_time`` seconds, whichever comes first
    (either may be None, not both); ``sliding`` > 0 also scores the sum of the last ``sliding`` windows. Windows are
    compared with the reference: a profile file, or the first ``capture`` calls the route sees. ``methods`` are
    computed for every series; ``detect`` is the one whose flag says "drifted"; ``thresholds`` override
    ``DRIFT_METHODS``' defaults, and ``calibrate`` (k) replaces the distance thresholds of each series by mean + k sd
    of its scores on chunks of the captured reference.
    """

    features: tuple[DriftFeature, ...] = ()
    outputs: tuple[str, ...] = ()
    bins: int = 10
    window: int | None = 1000
    window_time: float | None = None
    sliding: int = 0
    profile: str | None = None
    capture: int = 1000
    methods: tuple[str, ...] = ("ks", "psi", "js")
    detect: str = "ks"
    thresholds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType(dict(DRIFT_METHODS)))
    queue_size: int = 10_000
    history: int = 20
    ground_truth: GroundTruth | None = None
    attribution: Attribution | None = None
    multivariate: Multivariate | None = field(default_factory=Multivariate)
    calibrate: float | None = None
    export_bins: tuple[str, ...] = ()
    model_version: str = "unknown"
    percent: float = 100.0

    def threshold(self, method: str) -> float:
        return self.thresholds[method]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
    """Sampled calls of a route written as JSON lines to rotating files in the directory ``path``.

    ``percent`` (0-100) of calls are captured, chosen by the request-id hash as shadows choose theirs (the same calls
    on every replica). A file grows to at most ``max_file_bytes`` bytes, then the next one starts; at most
    ``max_files`` files are kept (the oldest is deleted), so captures take at most ``max_files * max_file_bytes``
    bytes of disk. At most ``queue_size`` records wait for the writer thread; beyond that they are dropped and
    counted. ``include``: ``request``, ``response`` or ``both``; ``tensors``: also write the decoded KServe tensors.
    """

    path: str
    percent: float = 100.0
    include: str = "both"
    tensors: bool = True
    max_file_bytes: int = 64 * 2**20
    max_files: int = 10
    queue_size: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where matching calls go: ``primary``, then each of ``fallback`` in order, then ``static_response``; copies
    of sampled unary calls also go to each of ``shadows``."""

    name: str
    match: RouteMatch
    primary: str
    fallback: tuple[str, ...] = ()
    fallback_on: frozenset[grpc.StatusCode] = DEFAULT_FALLBACK_CODES
    static_response: StaticResponse | None = None
    shadows: tuple[Shadow, ...] = ()
    compare: Compare = field(default_factory=Compare)
    promotion: Promotion = field(default_factory=Promotion)
    drift: Drift | None = None
    capture: Capture | None = None
    redact: tuple[str, ...] = ()

    def shadow(self, name: str) -> Shadow | None:
        return next((shadow for shadow in self.shadows if shadow.name == name), None)

    @property
    def chain(self) -> tuple[str, ...]:
        """Upstream names in the order they are tried."""
        return (self.primary, *self.fallback)


@dataclass(frozen=True, slots=True, kw_only=True)
class Observer:
    """The observing process of ``mlmirror serve`` (shadows, drift, ground truth, capture). ``nice``: how much lower
    its CPU priority is than the serving workers' (0 to 19; serving first)."""

    nice: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. ``source`` is the file it was read from. ``mode``: ``proxy`` serves clients'
    calls; ``observer`` serves Envoy's ext_proc stream instead and only watches (proxy/observing/extproc.py)."""

    source: str
    mode: str = "proxy"
    listen: str = "0.0.0.0:8500"
    admin: str | None = "127.0.0.1:9500"
    admin_token_file: str | None = None
    max_message_size: int = 4 * 2**20
    stream_replay_limit: int = 2**20
    shutdown_grace: float = 15.0
    observer: Observer = field(default_factory=Observer)
    mirror_shed_lag: float | None = 0.05
    tls: TlsServer | None = None
    method_types: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    upstreams: Mapping[str, Upstream] = field(default_factory=lambda: MappingProxyType({}))
    routes: tuple[Route, ...] = ()


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML configuration file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=file) from None
    return parse_config(text, file)


def parse_config(text: str, file: str = "<string>") -> Config:
    """Validate a YAML configuration given as text; ``file`` names it in errors."""
    root = parse_yaml(text, file)
    base = Path(file).parent if file != "<string>" else Path.cwd()
    readers: dict[str, Reader] = {
        "mode": _mode,
        "listen": Located.address,
        "admin": _admin_address,
        "admin_token_file": lambda n: _token_file(n, base),
        "max_message_size": lambda n: n.size(minimum=1024),
        "stream_replay_limit": lambda n: n.size(minimum=0),
        "shutdown_grace": Located.duration,
        "observer": _observer,
        "mirror_shed_lag": lambda n: None if n.is_null() or n.scalar() in (False, "off") else n.duration(minimum=0.001),
        "tls": lambda n: _tls_server(n, base),
        "method_types": lambda n: MappingProxyType(_method_types(n)),
        "upstreams": lambda n: MappingProxyType(_upstreams(n, base)),
        "routes": lambda n: n,  # read below, once the upstreams are known
    }
    values, keys = _read(root, readers, required=("upstreams", "routes"))
    upstreams = values["upstreams"]
    routes = tuple(_route(i, node, upstreams, base) for i, node in enumerate(keys["routes"].sequence()))
    if not routes:
        raise keys["routes"].error("at least one route is required")
    _check_routes(routes, keys["routes"])
    return Config(source=file, **{**values, "routes": routes})


Reader = Callable[[Located], Any]


def _read(node: Located, readers: Mapping[str, Reader], required: Iterable[str] = ()) -> tuple[dict, dict]:
    """Read a mapping whose keys are ``readers``' keys, each present one through its reader.

    Returns (values, located nodes), both keyed by the YAML key. Unknown keys and missing required ones are errors.
    """
    keys = node.mapping(readers, required)
    return {name: readers[name](value) for name, value in keys.items()}, keys


def _token_file(node: Located, base: Path) -> str:
    """A file holding the admin bearer token (read at start, stripped); it must exist and not be empty."""
    path = _existing_file(node, base)
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise node.error(f"cannot read the admin token file {path}: {exc}") from None
    if not token:
        raise node.error(f"the admin token file {path} is empty")
    return path


def _observer(node: Located) -> Observer:
    values, _ = _read(node, {"nice": lambda n: n.integer(minimum=0, maximum=19)})
    return Observer(**values)


def _mode(node: Located) -> str:
    """``proxy`` (clients call mlmirror) or ``observer`` (Envoy carries the calls and streams them to mlmirror over
    ext_proc)."""
    value = node.string()
    if value not in MODES:
        raise node.error(f"unknown mode {value!r} (one of {', '.join(MODES)})")
    return value


def _admin_address(node: Located) -> str | None:
    """The admin address; ``off``, ``false`` or null disable the admin endpoint."""
    if node.is_null() or node.scalar() in (False, "off"):
        return None
    return node.address()


def _upstreams(node: Located, base: Path) -> dict[str, Upstream]:
    upstreams = {name: _upstream(name, item, base) for name, item in node.dictionary().items()}
    if not upstreams:
        raise node.error("at least one upstream is required")
    return upstreams


def _upstream(name: str, node: Located, base: Path) -> Upstream:
    if _is_scalar(node) and not node.is_null():
        # Shorthand: `name: host:port`.
        return Upstream(name=name, address=node.target())
    readers: dict[str, Reader] = {
        "address": Located.target,
        "timeout": lambda n: n.duration(minimum=0.001),
        "keepalive": _keepalive,
        "tls": lambda n: _tls_client(n, base),
        "circuit": _circuit,
        "health_check": _health_check,
    }
    values, _ = _read(node, readers, required=("address",))
    return Upstream(name=name, **values)


def _is_scalar(node: Located) -> bool:
    return isinstance(node.node, yaml.ScalarNode)


def _keepalive(node: Located) -> Keepalive:
    values, _ = _read(node, {"time": lambda n: n.duration(minimum=1.0), "timeout": lambda n: n.duration(minimum=0.1)})
    return Keepalive(**values)


def _circuit(node: Located) -> CircuitPolicy:
    readers: dict[str, Reader] = {
        "failures": lambda n: n.integer(minimum=1),
        "ejection": lambda n: n.duration(minimum=0.001),
        "max_ejection": lambda n: n.duration(minimum=0.001),
        "jitter": lambda n: n.number(minimum=0.0, maximum=0.5),
        "codes": _status_codes,
    }
    values, keys = _read(node, readers)
    policy = CircuitPolicy(**values)
    if policy.max_ejection < policy.ejection:
        raise keys.get("max_ejection", node).error(
            f"max_ejection ({policy.max_ejection:g}s) must be at least ejection ({policy.ejection:g}s)"
        )
    return policy


def _health_check(node: Located) -> HealthCheck:
    readers: dict[str, Reader] = {
        "type": lambda n: _one_of(n, _HEALTH_CHECK_KINDS, "health check type"),
        "interval": lambda n: n.duration(minimum=0.05),
        "timeout": lambda n: n.duration(minimum=0.01),
        "service": lambda n: "" if n.is_null() else str(n.scalar()),
    }
    values, _ = _read(node, readers)
    return HealthCheck(**values)


def _one_of(node: Located, choices: tuple[str, ...], what: str) -> str:
    """A string among ``choices``; else an error naming ``what`` and the choices."""
    value = node.string()
    if value not in choices:
        raise node.error(f"unknown {what} {value!r} (one of {', '.join(choices)})")
    return value


def _path(node: Located, base: Path) -> Path:
    """A path; a relative one is taken from ``base`` (the config file's directory)."""
    path = Path(node.string())
    return path if path.is_absolute() else base / path


def _existing_file(node: Located, base: Path) -> str:
    path = _path(node, base)
    if not path.is_file():
        raise node.error(f"no such file: {path}")
    return str(path)


def _tls_client(node: Located, base: Path) -> TlsClient:
    keys = node.mapping(("ca", "cert", "key", "server_name"))
    if ("cert" in keys) != ("key" in keys):
        raise node.error("cert and key go together (client certificate for mTLS)")
    files = {k: _existing_file(keys[k], base) for k in ("ca", "cert", "key") if k in keys}
    server_name = keys["server_name"].string() if "server_name" in keys else None
    return TlsClient(**files, server_name=server_name)


def _tls_server(node: Located, base: Path) -> TlsServer:
    keys = node.mapping(("cert", "key", "client_ca"), required=("cert", "key"))
    return TlsServer(
        cert=_existing_file(keys["cert"], base),
        key=_existing_file(keys["key"], base),
        client_ca=_existing_file(keys["client_ca"], base) if "client_ca" in keys else None,
    )


def _status_codes(node: Located) -> frozenset[grpc.StatusCode]:
    codes = set()
    for item in node.sequence():
        name = item.string().upper()
        if name not in _STATUS_BY_NAME:
            raise item.error(f"unknown gRPC status code {name!r} (e.g. UNAVAILABLE, DEADLINE_EXCEEDED)")
        codes.add(_STATUS_BY_NAME[name])
    return frozenset(codes)


def _method_pattern(node: Located) -> str:
    """A route's method match: ``/pkg.Service/Method`` or ``/pkg.Service/*``."""
    method = node.string()
    parts = method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or ("*" in method and parts[2] != "*"):
        raise node.error(f"bad method {method!r}: expected /pkg.Service/Method or /pkg.Service/*")
    return method


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


_ROUTE_KEYS = ("name", "match", "primary", "fallback", "fallback_on", "static_response", "shadows", "compare",
               "promotion", "drift", "capture", "redact")  # fmt: skip


def _route(index: int, node: Located, upstreams: Mapping[str, Upstream], base: Path) -> Route:
    keys = node.mapping(_ROUTE_KEYS, required=("match", "primary"))
    match_keys = keys["match"].mapping(("method", "model"))
    match = RouteMatch(
        method=_method_pattern(match_keys["method"]) if "method" in match_keys else None,
        model=match_keys["model"].string() if "model" in match_keys else None,
    )

    def known(item: Located) -> str:
        name = item.string()
        if name not in upstreams:
            raise item.error(f"unknown upstream {name!r} (defined: {', '.join(sorted(upstreams))})")
        return name

    primary = known(keys["primary"])
    fallback_node = keys.get("fallback")
    fallback: list[str] = []
    if fallback_node is not None:
        items = (
            [fallback_node] if _is_scalar(fallback_node) and not fallback_node.is_null() else fallback_node.sequence()
        )
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
        fallback_on=_status_codes(keys["fallback_on"]) if "fallback_on" in keys else DEFAULT_FALLBACK_CODES,
        static_response=_static_response(keys["static_response"]) if "static_response" in keys else None,
        shadows=_shadows(keys["shadows"], known, primary) if "shadows" in keys else (),
        compare=_compare(keys["compare"]) if "compare" in keys else Compare(),
        promotion=_promotion(keys["promotion"]) if "promotion" in keys else Promotion(),
        drift=_drift(keys["drift"], base) if "drift" in keys else None,
        capture=_capture(keys["capture"], base) if "capture" in keys else None,
        redact=_redact(keys["redact"], match) if "redact" in keys else (),
    )


def _capture(node: Located, base: Path) -> Capture:
    def directory(n: Located) -> str:
        path = _path(n, base)
        if path.exists() and not path.is_dir():
            raise n.error(f"not a directory: {path}")
        return str(path)

    readers: dict[str, Reader] = {
        "path": directory,
        "percent": lambda n: n.number(minimum=0.0, maximum=100.0),
        "include": lambda n: _one_of(n, CAPTURE_INCLUDE, "include"),
        "tensors": Located.boolean,
        "max_file_bytes": lambda n: n.size(minimum=4096),
        "max_files": lambda n: n.integer(minimum=1, maximum=100_000),
        "queue_size": lambda n: n.integer(minimum=1, maximum=1_000_000),
    }
    values, _ = _read(node, readers, required=("path",))
    return Capture(**values)


def _redact(node: Located, match: RouteMatch) -> tuple[str, ...]:
    """Input tensor names to redact; only KServe ModelInfer requests can be redacted, so a route must be able to
    carry them."""
    names: list[str] = []
    for item in node.sequence():
        name = item.string()
        if name in names:
            raise item.error(f"input {name!r} is listed twice")
        names.append(name)
    if not names:
        raise node.error("give the input tensors to redact, or leave redact out")
    if not _covers(RouteMatch(method=match.method), RouteMatch(method=MODEL_INFER)):
        raise node.error(
            f"redact applies to KServe ModelInfer requests; this route matches only {match.method}: nothing to redact"
        )
    return tuple(names)


def _shadows(node: Located, known: Callable[[Located], str], primary: str) -> tuple[Shadow, ...]:
    shadows: list[Shadow] = []
    for item in node.sequence():
        readers: dict[str, Reader] = {
            "name": Located.string,
            "upstream": known,
            "percent": lambda n: n.number(minimum=0.0, maximum=100.0),
            "timeout": lambda n: n.duration(minimum=0.001),
            "max_inflight": lambda n: n.integer(minimum=1, maximum=100_000),
            "queue_size": lambda n: n.integer(minimum=0, maximum=1_000_000),
            "max_message_size": lambda n: n.size(minimum=1),
            "control": Located.boolean,
        }
        values, keys = _read(item, readers, required=("upstream",))
        shadow = Shadow(**{"name": values["upstream"], **values})
        if shadow.upstream == primary:
            raise keys["upstream"].error(f"upstream {primary!r} is this route's primary; a shadow must be another")
        if any(other.name == shadow.name for other in shadows):
            raise keys.get("name", item).error(f"shadow name {shadow.name!r} is used twice in this route; set name:")
        if shadow.control and any(other.control for other in shadows):
            raise keys["control"].error("a route has at most one control shadow")
        shadows.append(shadow)
    return tuple(shadows)


def _compare(node: Located) -> Compare:
    readers: dict[str, Reader] = {
        "atol": lambda n: n.number(minimum=0.0),
        "rtol": lambda n: n.number(minimum=0.0),
        "classification": lambda n: _one_of(n, CLASSIFICATION_MODES, "classification"),
        "output": Located.string,
    }
    values, _ = _read(node, readers)
    return Compare(**values)


def _drift(node: Located, base: Path) -> Drift:
    def feature(item: Located) -> DriftFeature:
        values, _ = _read(
            item,
            {
                "name": Located.string,
                "input": Located.string,
                "column": lambda n: n.integer(minimum=0, maximum=1_000_000),
                "categorical": Located.boolean,
            },
            required=("input",),
        )
        default = values["input"] if values.get("column") is None else f"{values['input']}[{values['column']}]"
        return DriftFeature(**{"name": default, **values})

    def method(item: Located) -> str:
        name = item.string()
        if name not in DRIFT_METHODS:
            raise item.error(f"unknown drift method {name!r} (one of {', '.join(DRIFT_METHODS)})")
        return name

    def thresholds(n: Located) -> MappingProxyType:
        given = {}
        for name, item in n.dictionary().items():
            if name not in DRIFT_METHODS:
                raise item.error(f"unknown drift method {name!r} (one of {', '.join(DRIFT_METHODS)})")
            given[name] = item.number(minimum=0.0, maximum=1.0 if name in ("ks", "chi2") else None)
        return MappingProxyType({**DRIFT_METHODS, **given})

    readers: dict[str, Reader] = {
        "features": lambda n: tuple(feature(item) for item in n.sequence()),
        "outputs": lambda n: tuple(item.string() for item in n.sequence()),
        "bins": lambda n: n.integer(minimum=1, maximum=1000),
        "window": lambda n: None if n.is_null() else n.integer(minimum=10, maximum=10_000_000),
        "window_time": lambda n: n.duration(minimum=0.1),
        "sliding": lambda n: n.integer(minimum=0, maximum=1000),
        "calibrate": lambda n: n.number(minimum=0.0, maximum=100.0),
        "export_bins": lambda n: tuple(item.string() for item in n.sequence()),
        "model_version": lambda n: str(n.scalar()),
        "percent": lambda n: n.number(minimum=0.0, maximum=100.0),
        "profile": lambda n: _existing_file(n, base),
        "capture": lambda n: n.integer(minimum=10, maximum=10_000_000),
        "methods": lambda n: tuple(method(item) for item in n.sequence()),
        "detect": method,
        "thresholds": thresholds,
        "queue_size": lambda n: n.integer(minimum=1, maximum=10_000_000),
        "history": lambda n: n.integer(minimum=1, maximum=10_000),
        "ground_truth": _ground_truth,
        "attribution": _attribution,
        "multivariate": _multivariate,
    }
    values, keys = _read(node, readers)
    drift = Drift(**values)
    if drift.window is None and drift.window_time is None:
        raise keys["window"].error("a window needs a size (window) or a duration (window_time)")
    names = [f.name for f in drift.features]
    if len(set(names)) != len(names):
        raise keys["features"].error(f"feature names must be unique, got {names}")
    if drift.detect not in drift.methods:
        raise keys.get("detect", node).error(f"detect method {drift.detect!r} is not in methods {list(drift.methods)}")
    return drift


def _multivariate(node: Located) -> Multivariate | None:
    """``off`` disables it; else {variance, k}."""
    if node.is_null() or (_is_scalar(node) and node.scalar() in (False, "off")):
        return None
    values, _ = _read(
        node,
        {
            "variance": lambda n: n.number(minimum=0.01, maximum=1.0),
            "k": lambda n: n.number(minimum=0.0, maximum=100.0),
        },
    )
    return Multivariate(**values)


def _attribution(node: Located) -> Attribution:
    readers: dict[str, Reader] = {
        "output": Located.string,
        "target": Located.string,
        "threshold": lambda n: n.number(minimum=0.0, maximum=1.0),
    }
    values, keys = _read(node, readers)
    if "output" in values and "target" in values:
        raise keys["target"].error("give output (an attribution tensor) or target (for a surrogate), not both")
    return Attribution(**values)


def _ground_truth(node: Located) -> GroundTruth:
    def task(n: Located) -> str:
        value = n.string()
        if value not in ("classification", "regression"):
            raise n.error(f"unknown task {value!r} (classification or regression)")
        return value

    readers: dict[str, Reader] = {
        "output": Located.string,
        "task": task,
        "ttl": lambda n: n.duration(minimum=1.0),
        "max_pending": lambda n: n.integer(minimum=1, maximum=100_000_000),
        "window": lambda n: n.integer(minimum=10, maximum=10_000_000),
    }
    values, _ = _read(node, readers, required=("output",))
    return GroundTruth(**values)


def _promotion(node: Located) -> Promotion:
    readers: dict[str, Reader] = {
        "window": lambda n: n.integer(minimum=1, maximum=1_000_000),
        "min_samples": lambda n: n.integer(minimum=1),
        "agreement": lambda n: n.number(minimum=0.0, maximum=1.0),
        "confidence": lambda n: n.number(minimum=0.5, maximum=0.9999),
        "error_margin": lambda n: n.number(minimum=0.0, maximum=1.0),
        "latency_factor": lambda n: n.number(minimum=0.01),
        "demote_to": lambda n: _one_of(n, DEMOTE_TO, "demote_to"),
    }
    values, keys = _read(node, readers)
    promotion = Promotion(**values)
    if promotion.min_samples > promotion.window:
        raise keys.get("min_samples", keys.get("window", node)).error(
            f"min_samples ({promotion.min_samples}) exceeds window ({promotion.window}): never promotable"
        )
    return promotion


def _default_route_name(index: int, match: RouteMatch) -> str:
    if match.is_catch_all:
        return "default"
    if match.model is not None:
        return match.model
    return f"route{index}"


def _static_response(node: Located) -> StaticResponse:
    keys = node.mapping(("model_version", "outputs"), required=("outputs",))
    outputs = []
    for item in keys["outputs"].sequence():
        t = item.mapping(("name", "datatype", "shape", "data"), required=("name", "datatype", "shape", "data"))
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


def _check_routes(routes: tuple[Route, ...], node: Located) -> None:
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
            if _covers(routes[j].match, route.match):
                raise items[i].error(
                    f"this route can never match: routes[{j}] ({routes[j].name}) above takes its calls"
                )


def _covers(earlier: RouteMatch, later: RouteMatch) -> bool:
    """True when every call ``later`` matches is already matched by ``earlier``."""
    if earlier.model is not None and earlier.model != later.model:
        return False
    if earlier.method is None:
        return True
    if later.method is None:
        return False
    if earlier.method.endswith("/*"):
        return later.method.startswith(earlier.method[:-1])
    return earlier.method == later.method

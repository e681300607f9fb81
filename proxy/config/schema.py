"""The configuration's schema: frozen dataclasses, one per YAML section, each field a documented key.

Every field is declared with ``setting(default, description, ...)`` (mlmirror.config.keys): its default is the
dataclass default, and docs/CONFIGURATION.md is generated from these declarations (``python -m
mlmirror.config.docs``). Units: durations are seconds (float), sizes bytes (int), percents 0-100. The drift and
capture sections are in ``mlmirror.config.schema_observing``, the process-wide ones (TLS, the observing process,
Feedback) in ``mlmirror.config.schema_process``; the readers that fill these objects from YAML in
``mlmirror.config.reader``.
"""

# ruff: noqa: RUF009 - setting() is a dataclasses.field with documentation, called once per class
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from mlmirror.config.keys import setting
from mlmirror.config.schema_observing import Capture, Drift
from mlmirror.config.schema_process import EnvoyTap, Feedback, Observer, TlsClient, TlsServer
from mlmirror.protocol.names import MODEL_INFER

__all__ = [
    "CALL_TYPES",
    "CLASSIFICATION_MODES",
    "CREDENTIAL_METADATA",
    "DEFAULT_FALLBACK_CODES",
    "DEMOTE_TO",
    "HEALTH_CHECK_KINDS",
    "SHADOW_TRANSPORTS",
    "MODEL_INFER",
    "MODES",
    "CircuitPolicy",
    "Compare",
    "Config",
    "HealthCheck",
    "Keepalive",
    "Promotion",
    "Route",
    "RouteMatch",
    "Shadow",
    "StaticResponse",
    "StaticTensor",
    "Upstream",
]

CALL_TYPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
DEFAULT_FALLBACK_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
HEALTH_CHECK_KINDS = ("connect", "grpc", "kserve")
#: how a shadow's copies travel (Shadow.transport)
SHADOW_TRANSPORTS = ("auto", "h2", "grpc")
CLASSIFICATION_MODES = ("none", "argmax", "label")
DEMOTE_TO = ("shadow", "fallback", "none")
MODES = ("proxy", "observer")
#: Request metadata that shadow copies never carry unless a shadow's ``forward_metadata`` names it: credentials.
CREDENTIAL_METADATA = ("authorization", "cookie", "proxy-authorization", "x-api-key")
#: Where the ext_proc observer listens when ``mode: observer`` gives no ``listen``: Envoy runs beside it.
OBSERVER_LISTEN = "127.0.0.1:8500"
#: Default largest message, in bytes, on the listener, to upstreams and to shadows.
MAX_MESSAGE_SIZE = 4 * 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class Keepalive:
    """HTTP/2 keepalive pings to an upstream: ping after ``time`` seconds idle, fail after ``timeout`` seconds."""

    time: float = setting(30.0, "HTTP/2 keepalive ping after this long idle, while calls are open", kind="duration",
                          minimum=1.0)  # fmt: skip
    timeout: float = setting(10.0, "the connection fails when a ping gets no answer within this", kind="duration",
                             minimum=0.1)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitPolicy:
    """Per-upstream circuit breaker.

    ``failures`` consecutive failed calls (status in ``codes``) open the circuit for
    ``min(ejection * 2**(n-1), max_ejection)`` seconds at the n-th ejection, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``; then one probe call is let through (half-open).
    """

    failures: int = setting(5, "consecutive failures that open the circuit", minimum=1)
    ejection: float = setting(5.0, "first ejection; doubles per consecutive ejection", kind="duration", minimum=0.001)
    max_ejection: float = setting(
        60.0, "cap on the ejection; also how long the circuit must stay closed to count ejections from zero again",
        kind="duration", minimum=0.001,
    )  # fmt: skip
    jitter: float = setting(0.1, "ejection times are scaled by a random factor in [1-jitter, 1+jitter]",
                            minimum=0.0, maximum=0.5)  # fmt: skip
    codes: frozenset[grpc.StatusCode] = setting(DEFAULT_FALLBACK_CODES, "statuses that count as failures", kind="codes")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """How the proxy decides an upstream is reachable, every ``interval`` seconds.

    type: ``connect`` (an HTTP/2 connection comes up), ``grpc`` (grpc.health.v1 Check of ``service`` says
    SERVING) or ``kserve`` (ServerReady, or ModelReady of ``service`` when set, says ready).
    """

    type: str = setting(
        "connect", "`connect`: an HTTP/2 connection comes up; `grpc`: grpc.health.v1 `Check` says SERVING; "
        "`kserve`: `ServerReady` (or `ModelReady` of `service`) says ready", choices=HEALTH_CHECK_KINDS,
        what="health check type",
    )  # fmt: skip
    interval: float = setting(5.0, "how often the upstream is checked", kind="duration", minimum=0.05)
    timeout: float = setting(1.0, "how long one check may take", kind="duration", minimum=0.01)
    service: str = setting("", "`grpc`: the service name to check; `kserve`: the model to check")


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A named target: one gRPC channel. ``timeout`` (seconds) caps each call to it; None: the client's deadline."""

    name: str = setting(internal=True)
    address: str = setting(
        doc="`host:port`, or a gRPC target URI: `dns:///models.internal:9000`, `unix:///run/model.sock`, "
        "`ipv4:10.0.0.1:9000,10.0.0.2:9000`", kind="target",
    )  # fmt: skip
    timeout: float | None = setting(
        None, "cap on each call to this upstream; the client's remaining deadline caps it too", kind="duration",
        minimum=0.001,
    )  # fmt: skip
    keepalive: Keepalive = setting(factory=Keepalive, doc="HTTP/2 keepalive pings")
    tls: TlsClient | None = setting(None, "TLS to the upstream (`{}`: with the system roots)")
    circuit: CircuitPolicy = setting(factory=CircuitPolicy, doc="the upstream's circuit breaker")
    health_check: HealthCheck = setting(factory=HealthCheck, doc="how reachability is checked (`/readyz`, circuit)")


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticTensor:
    """One output tensor of a static default response. A leading shape of -1 takes the request's batch size."""

    name: str = setting(doc="output tensor name")
    datatype: str = setting(doc="KServe datatype: `FP32`, `INT64`, `BYTES`, ...")
    shape: tuple[int, ...] = setting(doc="positive dimensions; a first `-1` repeats the row once per request row")
    values: tuple = setting((), "the elements, flat in row-major order", yaml="data", shown="required")


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticResponse:
    """The ModelInfer answer given when the whole fallback chain failed."""

    model_version: str = setting("static-default", "`model_version` of that answer")
    outputs: tuple[StaticTensor, ...] = setting((), "the answer's output tensors (at least one)", shown="required")


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """Which calls a route takes. ``method``: exact ``/pkg.Service/Method`` or ``/pkg.Service/*``; ``model``: the
    KServe model name (ModelInfer, ModelReady, ModelMetadata). Unset fields match anything."""

    method: str | None = setting(None, "`/pkg.Service/Method`, or `/pkg.Service/*` for a whole service", kind="method",
                             shown="any")  # fmt: skip
    model: str | None = setting(
        None, "KServe model name: `model_name` of ModelInfer, `name` of ModelReady and ModelMetadata", shown="any"
    )

    @property
    def is_catch_all(self) -> bool:
        return self.method is None and self.model is None

    def covers(self, later: RouteMatch) -> bool:
        """True when every call ``later`` matches is already matched by this match."""
        if self.model is not None and self.model != later.model:
            return False
        if self.method is None:
            return True
        if later.method is None:
            return False
        if self.method.endswith("/*"):
            return later.method.startswith(self.method[:-1])
        return self.method == later.method


@dataclass(frozen=True, slots=True, kw_only=True)
class Shadow:
    """An upstream that gets a fire-and-forget copy of a route's sampled unary calls.

    ``percent`` (0-100) of calls are mirrored, chosen by a hash of the request id (the same calls for every shadow
    at the same percent). At most ``max_inflight`` copies are in flight and ``queue_size`` wait; beyond that, and for
    requests over ``max_message_size`` bytes, copies are dropped and counted. ``timeout`` (seconds) caps each copy.
    A ``control`` shadow is a second instance of the production model: its disagreement with production is the
    noise baseline other shadows are judged against. ``batch`` > 1 sends up to that many waiting ``ModelInfer``
    copies as one request (proxy/observing/shadows/batching.py).
    """

    name: str = setting(doc="the `shadow` label", shown="the upstream's name")
    upstream: str = setting(doc="the upstream that gets copies (not the route's primary)")
    percent: float = setting(100.0, "share of calls mirrored, chosen by request-id hash", minimum=0, maximum=100)
    timeout: float = setting(2.0, "cap on each copy", kind="duration", minimum=0.001)
    max_inflight: int = setting(
        32, "copies in flight; beyond that and `queue_size`, copies are dropped (`queue_full`)", minimum=1,
        maximum=100_000,
    )  # fmt: skip
    queue_size: int = setting(256, "copies waiting for a free `max_inflight` slot", minimum=0, maximum=1_000_000)
    max_message_size: int = setting(MAX_MESSAGE_SIZE, "larger requests are not mirrored (`too_large`)", kind="size",
                                    minimum=1)  # fmt: skip
    batch: int = setting(
        1, "`ModelInfer` copies merged into one request along the first dimension (rows), for a model that answers "
        "each row on its own; 1 sends each copy alone", minimum=1, maximum=1024,
    )  # fmt: skip
    batch_check: int = setting(
        64, "with `batch` > 1: the first merged request and every Nth after it also send their first call alone; "
        "when the two answers differ, or the shadow fails the merged request but answers the call alone, merging "
        "stops for this shadow (`/status` says why); 0: never checked",
        minimum=0, maximum=1_000_000,
    )  # fmt: skip
    transport: str = setting(
        "auto", "how copies travel: `h2`, mlmirror's own HTTP/2 client for unary calls (about half of grpc.aio's CPU "
        "per copy); `grpc`, a grpc.aio channel (for streaming methods too); `auto`: `h2` when the upstream's "
        "`address` is one host (`host:port`, `dns:///`, one `ipv4:` or `ipv6:` address, `unix:`), else `grpc`",
        choices=SHADOW_TRANSPORTS, what="transport",
    )  # fmt: skip
    control: bool = setting(
        False, "a second instance of the production model: its disagreement is the noise baseline (at most one per "
        "route; never promoted)",
    )  # fmt: skip
    strip_metadata: tuple[str, ...] = setting(
        (), "request metadata (header names) copies never carry, besides the credentials always dropped: "
        + ", ".join(f"`{name}`" for name in CREDENTIAL_METADATA),
    )  # fmt: skip
    forward_metadata: tuple[str, ...] = setting(
        (), "dropped metadata copies carry all the same (say `authorization`, for a shadow that checks it)"
    )  # fmt: skip

    @property
    def stripped_metadata(self) -> frozenset[str]:
        """The request metadata keys (lower-case) a copy to this shadow goes without."""
        return frozenset((*CREDENTIAL_METADATA, *self.strip_metadata)) - frozenset(self.forward_metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare:
    """How a shadow's answer is compared with production's.

    Numbers match when ``|shadow - production| <= atol + rtol * |production|`` (NaN matches NaN). ``classification``
    picks what "agreement" means: ``none`` — a call agrees when every production output is matched; ``argmax`` —
    each row of ``output`` (the first output when unset) agrees when its argmax over the last axes is the same;
    ``label`` — each element of ``output`` agrees when equal.
    """

    atol: float = setting(1e-6, "absolute tolerance: numbers match when \\|s - p\\| ≤ atol + rtol·\\|p\\|", minimum=0)
    rtol: float = setting(1e-4, "relative tolerance of that match", minimum=0)
    classification: str = setting(
        "none", "what agreement means: `none` (a call agrees when every output matches), `argmax` (per row of "
        "`output`), `label` (per element of `output`)", choices=CLASSIFICATION_MODES, what="classification",
    )  # fmt: skip
    output: str | None = setting(None, "the output tensor `argmax`/`label` look at", shown="first output")


@dataclass(frozen=True, slots=True, kw_only=True)
class Promotion:
    """When a shadow is ready to replace the primary, judged over its last ``window`` mirrored calls.

    Promotable when the window holds at least ``min_samples`` agreement samples, the Wilson lower bound of the
    agreement ratio (at ``confidence``) plus the control's disagreement (noise) is at least ``agreement``, the
    shadow's error ratio is at most production's plus ``error_margin``, and the shadow's p99 latency is at most
    ``latency_factor`` times production's. ``demote_to``: what the old primary becomes when a shadow is promoted.
    """

    window: int = setting(1000, "mirrored calls the verdict looks back over", minimum=1, maximum=1_000_000)
    min_samples: int = setting(200, "agreement samples needed before a verdict can say yes (at most `window`)",
                               minimum=1)  # fmt: skip
    agreement: float = setting(0.98, "required Wilson lower bound of agreement (plus the control's noise)", minimum=0,
                               maximum=1)  # fmt: skip
    confidence: float = setting(0.95, "confidence of that bound", minimum=0.5, maximum=0.9999)
    error_margin: float = setting(0.01, "the shadow's error ratio may exceed production's by this much", minimum=0,
                                  maximum=1)  # fmt: skip
    latency_factor: float = setting(1.5, "the shadow's p99 latency may be this many times production's",
                                    minimum=0.01)  # fmt: skip
    demote_to: str = setting(
        "shadow", "what the old primary becomes on promotion: `shadow` (same settings as the promoted shadow), "
        "`fallback` (first), `none`", choices=DEMOTE_TO, what="demote_to",
    )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where matching calls go: ``primary``, then each of ``fallback`` in order, then ``static_response``; copies
    of sampled unary calls also go to each of ``shadows``."""

    name: str = setting(doc="the `route` label in metrics", shown="model name, `default`, or `routeN`")
    match: RouteMatch = setting(doc="which calls the route takes; `{}` takes every call", shown="required")
    primary: str = setting(doc="upstream that serves the route")
    fallback: tuple[str, ...] = setting((), "upstreams tried in order after the primary (one name or a list)")
    fallback_on: frozenset[grpc.StatusCode] = setting(
        DEFAULT_FALLBACK_CODES, "statuses that move a call to the next target (an open circuit always does)",
        kind="codes",
    )  # fmt: skip
    static_response: StaticResponse | None = setting(None, "ModelInfer answer when the whole chain failed")
    shadows: tuple[Shadow, ...] = setting((), "upstreams that get fire-and-forget copies of sampled unary calls",
                                      shown="none")  # fmt: skip
    compare: Compare = setting(factory=Compare, doc="how shadows' answers are compared with production's")
    promotion: Promotion = setting(factory=Promotion, doc="when a shadow is promotable")
    drift: Drift | None = setting(None, "drift monitoring of the route's ModelInfer calls (docs/DRIFT.md)")
    capture: Capture | None = setting(None, "write a sample of the route's unary calls to rotating JSON-lines files")
    redact: tuple[str, ...] = setting(
        (), "input tensors (by name) zeroed in shadow copies and captures; production gets the client's bytes. "
        "Only on routes that can carry ModelInfer calls",
    )  # fmt: skip

    def shadow(self, name: str) -> Shadow | None:
        return next((shadow for shadow in self.shadows if shadow.name == name), None)

    @property
    def chain(self) -> tuple[str, ...]:
        """Upstream names in the order they are tried."""
        return (self.primary, *self.fallback)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. ``source`` is the file it was read from. ``mode``: ``proxy`` serves clients'
    calls; ``observer`` serves Envoy's ext_proc stream instead and only watches (proxy/observing/extproc.py)."""

    source: str = setting(internal=True)
    mode: str = setting(
        "proxy", "`proxy`: clients call mlmirror, which forwards; `observer`: Envoy carries the calls and streams "
        "them to mlmirror's listener over ext_proc, and mlmirror only watches", choices=MODES, what="mode",
    )  # fmt: skip
    listen: str = setting(
        "0.0.0.0:8500", "gRPC listener (`host:port`, IPv6 as `[::1]:8500`)", kind="address",
        shown=f"`0.0.0.0:8500`; `{OBSERVER_LISTEN}` in observer mode",
    )  # fmt: skip
    admin: str | None = setting("127.0.0.1:9500", "admin HTTP endpoint; `off` or `null` disables it", kind="address")
    admin_token_file: str | None = setting(
        None, "a file holding a bearer token: every admin endpoint but `/healthz` and `/readyz` then wants "
        "`Authorization: Bearer <token>`; the CLI sends `$MLMIRROR_ADMIN_TOKEN`", kind="file",
    )  # fmt: skip
    max_message_size: int = setting(
        MAX_MESSAGE_SIZE, "largest message in either direction, on the listener and to upstreams; a larger request "
        "gets `RESOURCE_EXHAUSTED`", kind="size", minimum=1024,
    )  # fmt: skip
    stream_replay_limit: int = setting(
        2**20, "bytes of a client's request stream kept so that it can be replayed to a fallback", kind="size",
        minimum=0,
    )  # fmt: skip
    shutdown_delay: float = setting(2.0, "after SIGTERM, how long the proxy still serves while it reports not-ready "
        "(`/readyz` 503, grpc health `NOT_SERVING`), so that load balancers stop sending before it stops accepting "
        "(docs/RELIABILITY.md)", kind="duration", minimum=0.0)  # fmt: skip
    shutdown_grace: float = setting(15.0, "then, once it stops accepting, how long calls may take", kind="duration")
    observer: Observer = setting(factory=Observer, doc="the observing process (`mlmirror serve`)")
    envoy_tap: EnvoyTap | None = setting(
        None, "observer mode: read the calls from Envoy's tap filter (its admin, beside mlmirror) as well as from "
        "ext_proc",
    )  # fmt: skip
    feedback: Feedback = setting(factory=Feedback, doc="who may report outcomes (`ReportOutcome`, `POST /outcomes`)")
    mirror_shed_lag: float | None = setting(
        0.05, "when the event loop wakes up later than this, shadow copies are dropped (`shed`) until it recovers; "
        "`off` disables", kind="duration", minimum=0.001,
    )  # fmt: skip
    tls: TlsServer | None = setting(None, "TLS on the listener")
    method_types: Mapping[str, str] = setting(
        factory=lambda: MappingProxyType({}), each="<method>", choices=CALL_TYPES, shown="none",
        doc="call type of a non-KServe method (a full `/pkg.Service/Method` name); others are relayed as "
        "stream-stream",
    )  # fmt: skip
    upstreams: Mapping[str, Upstream] = setting(
        factory=lambda: MappingProxyType({}), shown="required",
        doc="the targets, by name; `name: host:port` is shorthand for `{address: host:port}`",
    )  # fmt: skip
    routes: tuple[Route, ...] = setting((), "tried in order; the first whose `match` accepts the call takes it",
                                    shown="required")  # fmt: skip

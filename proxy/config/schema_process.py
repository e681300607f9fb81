"""The configuration's process-wide sections: TLS (to upstreams and on the listener), the observing process, and
who may report outcomes (``feedback``). Declared like the rest of the schema (``mlmirror.config.schema``)."""

from __future__ import annotations

from dataclasses import dataclass

from mlmirror.config.keys import setting
from mlmirror.protocol.names import MODEL_INFER

__all__ = ["OBSERVER_SCHEDULING", "EnvoyTap", "Feedback", "Observer", "TlsClient", "TlsServer"]

OBSERVER_SCHEDULING = ("nice", "idle")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClient:
    """TLS from the proxy to an upstream. Paths to PEM files; all optional (system roots when ``ca`` is unset)."""

    ca: str | None = setting(None, "CA bundle that signs the upstream's certificate", kind="file", shown="system roots")
    cert: str | None = setting(None, "client certificate for mutual TLS (with `key`)", kind="file")
    key: str | None = setting(None, "private key of `cert`", kind="file")
    server_name: str | None = setting(None, "overrides the name checked in the upstream's certificate")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsServer:
    """TLS on the listener; ``client_ca`` set means clients must present a certificate it signed (mTLS)."""

    cert: str = setting(doc="the listener's certificate (PEM)", kind="file")
    key: str = setting(doc="its private key (PEM)", kind="file")
    client_ca: str | None = setting(None, "require client certificates signed by this CA (mTLS)", kind="file")


@dataclass(frozen=True, slots=True, kw_only=True)
class Observer:
    """The observing process of ``mlmirror serve``: shadows, drift, ground truth and capture, apart from serving."""

    nice: int = setting(
        10, "how much lower its CPU priority is than the serving workers' (`nice`): serving first", minimum=0,
        maximum=19,
    )  # fmt: skip
    scheduling: str = setting(
        "nice", "`nice`: the niceness above; `idle`: its threads run only on a CPU nothing else wants (Linux "
        "`SCHED_IDLE`, its scheduling group at nice 19), which on a busy machine leaves copies unmade "
        "(docs/BENCHMARKS.md)", choices=OBSERVER_SCHEDULING,
    )  # fmt: skip
    cpu_pressure_limit: float | None = setting(
        None, "while some task waited for a CPU more than this share of the last 0.25 s (Linux PSI, the "
        "container's when it has its own), the calls handed over are dropped and counted (`cpu_pressure`), so "
        "that the CPU goes to serving (docs/BENCHMARKS.md); `off`: shed only when behind", shown="off", minimum=0,
        maximum=1,
    )  # fmt: skip
    serving_idle: float | None = setting(
        0.4, "the observing process takes the next calls handed over (and drift its next batch) only while some "
        "serving worker's event loop was asleep for this share of the last ~10 ms (read from `/proc` every 1 ms); "
        "else it waits, at most 0.2 s each time, and a worker whose hand-off backs up drops and counts "
        "(`backpressure`): at saturation serving gets the CPU (docs/BENCHMARKS.md); `off`: never waits", minimum=0.01,
        maximum=1,
    )  # fmt: skip
    cpu_limit: float | None = setting(
        None, "the CPUs the observing process may use (CPU seconds per second, all its threads): while its last "
        "0.1 s used more, the calls handed over are dropped and counted (`cpu_limit`), so that a busy machine's CPU "
        "goes to serving however much there is to observe (docs/BENCHMARKS.md); `off`: no limit", shown="off",
        minimum=0.01, maximum=1024,
    )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvoyTap:
    """Observer mode reading the calls from Envoy's tap filter (envoy/dataplane-tap.yaml), beside Envoy: mlmirror
    attaches to Envoy's ``POST /tap`` admin with a ``buffered_admin`` sink, so Envoy keeps up to ``batch`` calls
    and sends them at once, then taps nothing until mlmirror attaches again (proxy/observing/envoytap.py)."""

    admin: str = setting(doc="Envoy's admin endpoint (`host:port`), beside mlmirror", kind="address")
    config_id: str = setting("mlmirror", "the tap filter's `admin_config.config_id` in Envoy's config")
    method: str = setting(
        MODEL_INFER, "the calls Envoy taps: this `:path` (a full gRPC method name)"
    )  # fmt: skip
    batch: int = setting(
        5000, "calls Envoy keeps before it sends them; bounds Envoy's memory for the tap at `batch` times the "
        "request and response bytes of a call", minimum=1, maximum=100_000,
    )  # fmt: skip
    flush: float = setting(5.0, "longest Envoy waits for a batch to fill before it sends it", kind="duration",
                           minimum=0.01)  # fmt: skip
    runtime_key: str = setting(
        "mlmirror.observed_percent", "Envoy runtime key of the share of calls tapped (100% unless set; "
        "`POST /runtime_modify?mlmirror.observed_percent=10` on Envoy's admin)",
    )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Feedback:
    """Who may report outcomes (``mlmirror.v1.Feedback/ReportOutcome``, ``POST /outcomes``): docs/SECURITY.md.

    On a listener that is not loopback, a call needs a credential: ``authorization: Bearer <token>`` with the token
    of ``token_file`` (gRPC metadata or HTTP header), or a client certificate (mTLS, ``tls.client_ca``) whose
    subject, common name or a SAN is in ``clients``. With neither, Feedback is served only on a loopback listener,
    or on ``listen``, a loopback address of its own.
    """

    token_file: str | None = setting(
        None, "a file holding the bearer token a Feedback call must send (`authorization: Bearer <token>`, over "
        "gRPC and on `POST /outcomes`); read at start", kind="file",
    )  # fmt: skip
    clients: tuple[str, ...] = setting(
        (), "client certificates (mTLS on the listener: needs `tls.client_ca`) allowed to report, by subject "
        "(`CN=labeler,O=ml`), common name or SAN (`spiffe://...`, a DNS name)",
    )  # fmt: skip
    listen: str | None = setting(
        None, "a listener of its own for Feedback only (plain gRPC): loopback, or any address with `token_file`",
        kind="address", shown="none",
    )  # fmt: skip
    early_max: int = setting(
        10_000, "outcomes that arrive before their prediction, parked until it lands (counted `early`); beyond this "
        "the oldest is dropped and counted `unknown`; under 500 bytes each (under 5 MB at the default); 0: none parked",
        minimum=0, maximum=10_000_000,
    )  # fmt: skip
    early_ttl: float = setting(10.0, "how long a parked outcome waits for its prediction; then it counts `unknown`",
                               kind="duration", minimum=0.001)  # fmt: skip

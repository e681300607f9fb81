"""Who may report outcomes: the credential a Feedback call needs where it enters mlmirror (docs/SECURITY.md).

Outcomes move the accuracy figures and the alerts on them, so a call that reports them (``ReportOutcome`` on a
listener, ``POST /outcomes`` on the admin endpoint) must prove it may:

- with ``feedback.token_file``: ``authorization: Bearer <token>`` (gRPC metadata or HTTP header);
- with ``feedback.clients`` (gRPC, on a listener with ``tls.client_ca``): a client certificate whose subject,
  common name or one of its SANs is in the list;
- on ``POST /outcomes``, the admin token (``admin_token_file``) is accepted too: its holder may do more already;
- with no credential configured, only where the address is loopback (a Unix socket counts): elsewhere Feedback is
  closed, and the start-up log says how to open it.

A credential that is configured is always required, loopback or not. Tokens are compared in constant time (their
SHA-256 digests, so even the length does not leak) and never logged. Refused calls are counted by reason in
``mlmirror_feedback_rejected_total``: ``missing`` (no credential sent), ``wrong_token``, ``certificate`` (a client
certificate not in ``feedback.clients``), ``closed`` (nothing can open Feedback on this address). The gate stands
where a call enters; the relay from a worker to the observing process (a Unix socket in a folder only this user
opens) is internal and carries no credential.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import grpc
from mlmirror.config import Config
from mlmirror.config.addresses import is_loopback
from mlmirror.observing.groundtruth.feedback import serve_feedback_only
from prometheus_client import CollectorRegistry, Counter

__all__ = ["REJECT_REASONS", "FeedbackEntrances", "FeedbackGate", "certificate_names", "rejection_counter"]

log = logging.getLogger(__name__)

REJECT_REASONS = ("missing", "wrong_token", "certificate", "closed")
#: auth_context() keys that name the client of a TLS connection (its verified certificate).
_CERTIFICATE_KEYS = ("x509_subject", "x509_common_name", "x509_subject_alternative_name")
_OPEN_HOW = (
    "set feedback.token_file (clients send authorization: Bearer <token>), or feedback.clients with tls.client_ca "
    "(mTLS), or feedback.listen: 127.0.0.1:<port> for a reporter on this host (docs/SECURITY.md)"
)


def rejection_counter(registry: CollectorRegistry) -> Counter:
    """``mlmirror_feedback_rejected_total{reason}``, every reason's series present from the start."""
    counter = Counter(
        "mlmirror_feedback_rejected", "Feedback calls (ReportOutcome, POST /outcomes) refused, by reason.",
        ["reason"], registry=registry,
    )  # fmt: skip
    for reason in REJECT_REASONS:
        counter.labels(reason)
    return counter


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """The names a verified client certificate goes by: subject, common name, SANs (from gRPC's auth context)."""
    names: set[str] = set()
    for key in _CERTIFICATE_KEYS:
        for value in auth_context.get(key, ()):
            names.add(_name(value.decode(errors="replace") if isinstance(value, bytes) else str(value)))
    return frozenset(names)


def _name(name: str) -> str:
    """A certificate name to compare: a subject's attributes in a fixed order (gRPC gives ``O=ml,CN=labeler`` for
    ``/CN=labeler/O=ml``), anything else as it is."""
    if "=" not in name or ":" in name.split("=", 1)[0]:  # a SAN URI may hold "=" in its query
        return name
    return ",".join(sorted(part.strip() for part in name.split(",")))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class FeedbackGate:
    """The check on one entry point (``where``: a listener or admin address) of Feedback calls.

    ``tokens``: the bearer tokens accepted (empty: none configured); ``clients``: the certificate names accepted;
    ``loopback``: the address is reachable from this host only. ``rejected`` counts refusals by reason."""

    def __init__(
        self, where: str, tokens: Iterable[str], clients: Iterable[str], rejected: Counter, *, loopback: bool
    ) -> None:
        self.where = where
        self._digests = tuple(_digest(token) for token in tokens)
        self._clients = frozenset(_name(client) for client in clients)
        self._rejected = rejected
        self.loopback = loopback
        self._warned: set[str] = set()

    @classmethod
    def for_listener(cls, config: Config, address: str, rejected: Counter, *, tls: bool) -> FeedbackGate:
        """The gate of a gRPC listener on ``address``; ``tls``: it asks for client certificates (mTLS)."""
        clients = config.feedback.clients if tls else ()
        return cls(address, _tokens(config.feedback.token_file), clients, rejected, loopback=is_loopback(address))

    @classmethod
    def for_admin(
        cls, config: Config, address: str, admin_token: str | None, rejected: Counter, *, internal: bool = False
    ) -> FeedbackGate:
        """The gate of ``POST /outcomes`` on the admin endpoint at ``address``: the feedback token or the admin
        token. ``internal``: the observing process's own endpoint, which the supervisor calls with the admin token."""
        tokens = [*([] if internal else _tokens(config.feedback.token_file)), *([admin_token] if admin_token else [])]
        return cls(address, tokens, (), rejected, loopback=is_loopback(address))

    @property
    def open(self) -> bool:
        """Whether some call can get through (a credential is configured, or the address is loopback)."""
        return bool(self._digests or self._clients or self.loopback)

    def refusal(self, authorization: str | None, certificate: frozenset[str] = frozenset()) -> str | None:
        """None when a call with this ``authorization`` value and client ``certificate`` names may report; else
        the reason it may not (counted)."""
        reason = self._reason(authorization, certificate)
        if reason is not None:
            self._rejected.labels(reason).inc()
            if reason not in self._warned:  # the first of each reason; never the token
                self._warned.add(reason)
                log.warning("Feedback on %s: a call was refused (%s); further refusals are only counted in "
                            "mlmirror_feedback_rejected_total", self.where, reason)  # fmt: skip
        return reason

    def _reason(self, authorization: str | None, certificate: frozenset[str]) -> str | None:
        if not self._digests and not self._clients:
            return None if self.loopback else "closed"
        scheme, _, given = (authorization or "").partition(" ")
        bearer = given.strip() if scheme.lower() == "bearer" and given.strip() else None
        if bearer is not None:
            digest = _digest(bearer)
            # Every configured token is compared, so the time taken does not say which one came close.
            if sum(hmac.compare_digest(digest, expected) for expected in self._digests):
                return None
        if self._clients and certificate & self._clients:
            return None
        if bearer is not None and self._digests:
            return "wrong_token"
        if self._clients and certificate:
            return "certificate"
        return "missing"

    def message(self, reason: str) -> str:
        """What a refused caller is told (no secret in it)."""
        if reason == "closed":
            return f"Feedback is not served on {self.where} (not loopback, no credential configured): {_OPEN_HOW}"
        if reason == "certificate":
            return "this client certificate is not among feedback.clients"
        if reason == "wrong_token":
            return "the bearer token is not the feedback token"
        wanted = ["authorization: Bearer <feedback token>"] if self._digests else []
        wanted += ["a client certificate listed in feedback.clients"] if self._clients else []
        return "Feedback needs a credential: " + " or ".join(wanted)

    async def admit(self, context: grpc.aio.ServicerContext) -> None:
        """Let a gRPC call through, or end it: UNAUTHENTICATED without a valid credential, PERMISSION_DENIED when
        the certificate is not allowed or Feedback is closed here."""
        authorization = next((str(value) for key, value in context.invocation_metadata() or ()
                              if key == "authorization"), None)  # fmt: skip
        certificate = certificate_names(context.auth_context()) if self._clients else frozenset()
        reason = self.refusal(authorization, certificate)
        if reason is not None:
            code = grpc.StatusCode.PERMISSION_DENIED if reason in ("closed", "certificate") else None
            await context.abort(code or grpc.StatusCode.UNAUTHENTICATED, self.message(reason))

    def refuse_http(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """None when an HTTP request with ``headers`` (lower-case names) may report; else (status, text)."""
        reason = self.refusal(headers.get("authorization"))
        if reason is None:
            return None
        return (403 if reason == "closed" else 401), self.message(reason).replace("Feedback", "POST /outcomes", 1)

    def describe(self) -> str:
        """The start-up line about this entry point."""
        if not self.open:
            return f"Feedback (ReportOutcome, POST /outcomes) is closed on {self.where}: it is not loopback and no " \
                   f"credential is configured; to open it, {_OPEN_HOW}"  # fmt: skip
        needs = [*(["a bearer token (feedback.token_file)"] if self._digests else []),
                 *(["a client certificate in feedback.clients"] if self._clients else [])]  # fmt: skip
        return f"Feedback on {self.where}: " + (" or ".join(needs) if needs else "open (loopback)")


class FeedbackEntrances:
    """Where Feedback calls enter one process, each with its gate: the gRPC listener (``listen``; ``tls``: it asks
    for client certificates), ``feedback.listen`` when set, and ``POST /outcomes`` on the admin endpoint
    (``admin``). ``internal``: the observing process, reached only through the supervisor and its workers: its
    listener is not guarded and it opens no ``feedback.listen``."""

    def __init__(
        self, config: Config, registry: CollectorRegistry, *, listen: str, tls: bool, admin: str | None,
        admin_token: str | None, internal: bool,
    ) -> None:  # fmt: skip
        self.rejected = rejection_counter(registry)
        self.listener = None if internal else FeedbackGate.for_listener(config, listen, self.rejected, tls=tls)
        own = None if internal else config.feedback.listen
        self.own = None if own is None else FeedbackGate.for_listener(config, own, self.rejected, tls=False)
        self.admin = None
        if admin is not None:
            self.admin = FeedbackGate.for_admin(config, admin, admin_token, self.rejected, internal=internal)
        self._server: grpc.aio.Server | None = None
        #: the port ``feedback.listen`` is bound to (0: none)
        self.port = 0

    async def start(self, handler: Callable[[FeedbackGate | None], grpc.GenericRpcHandler], *, shared: bool) -> None:
        """Open ``feedback.listen`` (if set) with ``handler(gate)``; ``shared``: workers share its port. Then log
        how each entry point is guarded. Raises OSError when it cannot bind."""
        if self.own is not None:
            self._server, self.port = await serve_feedback_only(self.own.where, handler(self.own), reuse_port=shared)
        for gate in (self.listener, self.own):
            if gate is not None:
                (log.info if gate.open else log.warning)("%s", gate.describe())

    def refuse_http(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """None when ``POST /outcomes`` with these headers may report; else (status, text)."""
        return None if self.admin is None else self.admin.refuse_http(headers)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


def _tokens(path: str | None) -> list[str]:
    """The token in ``path`` (checked by the config reader), as a list; none without a path."""
    return [Path(path).read_text(encoding="utf-8").strip()] if path else []

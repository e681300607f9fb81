"""One upstream: its gRPC channel, cached byte-level stubs, circuit breaker and health state.

Stubs are created without serializers, so requests and responses cross the proxy as the exact bytes the client and
the model server sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from mlmirror.config import HealthCheck, TlsClient, Upstream
from mlmirror.metrics import Metrics
from mlmirror.protocol.names import MODEL_READY, SERVER_READY
from mlmirror.protos import inference_pb2
from mlmirror.serving.resilience import CircuitBreaker, CircuitState

__all__ = ["UpstreamTarget", "channel_options"]

log = logging.getLogger(__name__)

_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


def channel_options(spec: Upstream, max_message_size: int) -> list[tuple[str, int | str]]:
    """gRPC channel arguments for an upstream.

    Retries are off (the fallback chain decides what happens after a failure); reconnect backoff is capped at 2 s so
    that a restarted model server is used again within seconds, not gRPC's default two minutes; each upstream gets
    its own subchannel pool so that two names for one address still get separate connections.
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.keepalive_time_ms", int(spec.keepalive.time * 1000)),
        ("grpc.keepalive_timeout_ms", int(spec.keepalive.timeout * 1000)),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if spec.tls is not None and spec.tls.server_name:
        options.append(("grpc.ssl_target_name_override", spec.tls.server_name))
    return options


def _credentials(tls: TlsClient) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca), private_key=read(tls.key), certificate_chain=read(tls.cert)
    )


class UpstreamTarget:
    """A live upstream built from its config: ``spec`` never changes; a changed spec makes a new target."""

    def __init__(self, spec: Upstream, *, max_message_size: int, metrics: Metrics) -> None:
        self.spec = spec
        self.name = spec.name
        self.timeout = spec.timeout
        self.max_message_size = max_message_size
        options = channel_options(spec, max_message_size)
        if spec.tls is None:
            self.channel = grpc.aio.insecure_channel(spec.address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(spec.address, _credentials(spec.tls), options=options)
        state_gauge = metrics.circuit_state.labels(spec.name)
        ejections = metrics.circuit_ejections.labels(spec.name)

        def on_change(state: CircuitState) -> None:
            state_gauge.set(state.value)
            if state is CircuitState.OPEN:
                ejections.inc()
                log.warning(
                    "upstream %s: circuit open for %.1fs", self.name, self.breaker.open_until - time.monotonic()
                )
            else:
                log.info("upstream %s: circuit %s", self.name, state.name.lower())

        def connected() -> bool:
            return self.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY

        self.breaker = CircuitBreaker(spec.circuit, on_change=on_change, probe_ready=connected)
        state_gauge.set(CircuitState.CLOSED.value)
        self._up_gauge = metrics.upstream_up.labels(spec.name)
        self.reachable: bool | None = None  # None: not checked yet
        self.health_detail = "not checked yet"
        self.checked_at: float | None = None
        self._stubs: dict[tuple[str, str], object] = {}

    def stub(self, call_type: str, method: str):
        """The cached bytes-in, bytes-out multi-callable for ``method`` of ``call_type`` (``unary_unary`` ...)."""
        key = (call_type, method)
        stub = self._stubs.get(key)
        if stub is None:
            if len(self._stubs) >= 4096:  # method names come from clients: never let them grow this cache unbounded
                self._stubs.clear()
            stub = self._stubs[key] = getattr(self.channel, call_type)(method)
        return stub

    async def check_health(self) -> bool:
        """Run the configured health check once; updates ``reachable``, ``health_detail`` and the gauge."""
        check = self.spec.health_check
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that races with
            # completion, and this loop must stop when the proxy does.
            async with asyncio.timeout(check.timeout):
                ok, detail = await self._probe(check)
        except TimeoutError:
            state = self.channel.get_state(try_to_connect=False)
            ok, detail = False, f"no answer within {check.timeout:g}s (channel {state.name})"
        except grpc.aio.AioRpcError as exc:
            ok, detail = False, f"{check.type} check failed: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # a health check must never take its loop down
            ok, detail = False, f"{check.type} check error: {exc!r}"
        if ok != self.reachable:
            log.log(
                logging.INFO if ok else logging.WARNING, "upstream %s (%s): %s", self.name, self.spec.address, detail
            )
        self.reachable, self.health_detail, self.checked_at = ok, detail, time.time()
        self._up_gauge.set(1 if ok else 0)
        return ok

    async def _probe(self, check: HealthCheck) -> tuple[bool, str]:
        if check.type == "connect":
            await self.channel.channel_ready()
            return True, "connected"
        if check.type == "grpc":
            reply = await self.channel.unary_unary(
                _HEALTH_CHECK_METHOD,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(service=check.service), wait_for_ready=True)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            return reply.status == health_pb2.HealthCheckResponse.SERVING, f"grpc health: {status}"
        if check.service:
            reply = await self.channel.unary_unary(
                MODEL_READY,
                request_serializer=inference_pb2.ModelReadyRequest.SerializeToString,
                response_deserializer=inference_pb2.ModelReadyResponse.FromString,
            )(inference_pb2.ModelReadyRequest(name=check.service), wait_for_ready=True)
            return reply.ready, f"model {check.service} ready" if reply.ready else f"model {check.service} not ready"
        reply = await self.channel.unary_unary(
            SERVER_READY,
            request_serializer=inference_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=inference_pb2.ServerReadyResponse.FromString,
        )(inference_pb2.ServerReadyRequest(), wait_for_ready=True)
        return reply.ready, "server ready" if reply.ready else "server not ready"

    @property
    def available(self) -> bool:
        """Reachable by the last health check and not ejected by the circuit breaker."""
        return bool(self.reachable) and self.breaker.state is not CircuitState.OPEN

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for ``/status``."""
        return {
            "address": self.spec.address,
            "tls": self.spec.tls is not None,
            "timeout_seconds": self.timeout,
            "reachable": self.reachable,
            "health": self.health_detail,
            "health_check": self.spec.health_check.type,
            "checked_at": self.checked_at,
            "circuit": self.breaker.snapshot(),
        }

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

"""The gRPC listener of a proxy process: what it serves depends on the role and mode.

- a lone proxy or a worker: the generic relay (any method, bytes untouched), or in observer mode Envoy's ext_proc
  service instead;
- the hub: nothing but Feedback (the workers relay it there) and health.

Every listener also serves mlmirror's Feedback service, grpc.health.v1 and server reflection (of what it serves).

The relay stands behind a ``Door`` (proxy/runtime/shutdown.py) that the graceful stop closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mlmirror.config import Config
from mlmirror.errors import StartError
from mlmirror.metrics import Metrics
from mlmirror.observing.extproc import ExtProcObserver, TableSource
from mlmirror.protocol.names import EXT_PROC_SERVICE, FEEDBACK_SERVICE, INFERENCE_SERVICE

__all__ = ["Listener", "ext_proc_observer", "start_listener"]


@dataclass(frozen=True, slots=True)
class Listener:
    """What a listener serves: ``relay`` (the generic handler) or ``ext_proc`` (an ExternalProcessor servicer) or
    neither (the hub), plus ``feedback`` (a generic handler) and ``health`` (the servicer)."""

    feedback: grpc.GenericRpcHandler
    health: health.aio.HealthServicer
    relay: grpc.GenericRpcHandler | None = None
    ext_proc: object | None = None


def ext_proc_observer(source: TableSource, metrics: Metrics, config: Config) -> ExtProcObserver:
    """Observer mode's servicer: streams from Envoy routed with ``source``'s current table, counted in ``metrics``."""
    observer = ExtProcObserver(source, metrics.extproc_streams, config.max_message_size)
    metrics.extproc_active_streams.set_function(lambda: observer.active)
    return observer


async def start_listener(
    config: Config, address: str, serves: Listener, *, reuse_port: bool, tls: bool
) -> tuple[grpc.aio.Server, int]:
    """Bind ``address`` and start serving; (server, bound port). Raises ``StartError`` when it cannot bind or a
    TLS file cannot be read. ``reuse_port``: share the port with the other workers (SO_REUSEPORT)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_size),
            ("grpc.max_send_message_length", config.max_message_size),
            # Workers share their port on purpose; otherwise a second proxy on the port must fail, not share it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(serves.health, server)
    server.add_generic_rpc_handlers((serves.feedback,))
    if serves.ext_proc is not None:
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(serves.ext_proc, server)
        served = EXT_PROC_SERVICE
    elif serves.relay is not None:
        server.add_generic_rpc_handlers((serves.relay,))
        served = INFERENCE_SERVICE
    else:
        served = FEEDBACK_SERVICE
    services = dict.fromkeys((served, FEEDBACK_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME))
    reflection.enable_server_reflection(tuple(services), server)
    try:
        if not tls or config.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(config))
    except (RuntimeError, OSError) as exc:
        raise StartError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    return server, port


def server_credentials(config: Config) -> grpc.ServerCredentials:
    """The listener's TLS credentials from the config's files (client certificates required with ``client_ca``)."""
    assert config.tls is not None
    pair = (Path(config.tls.key).read_bytes(), Path(config.tls.cert).read_bytes())
    client_ca = Path(config.tls.client_ca).read_bytes() if config.tls.client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)

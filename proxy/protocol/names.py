"""Names on the wire, in one place: gRPC service names, KServe V2 method paths, and the metadata keys mlmirror reads
or writes.

Everything here is a plain string (or a frozen set of them); the module imports nothing, so any layer may use it.
"""

from __future__ import annotations

__all__ = [
    "ENVOY_REQUEST_ID",
    "EXT_PROC_SERVICE",
    "FEEDBACK_SERVICE",
    "HOP_BY_HOP_METADATA",
    "INFERENCE_SERVICE",
    "KSERVE_METHOD_PREFIX",
    "MODEL_INFER",
    "MODEL_METADATA",
    "MODEL_READY",
    "MODEL_STREAM_INFER",
    "REPLAY",
    "REQUEST_ID",
    "SERVED_BY",
    "SERVER_LIVE",
    "SERVER_METADATA",
    "SERVER_READY",
    "SHADOW",
    "STATIC_DEFAULT",
    "TRACE_METADATA",
]

# --- services ------------------------------------------------------------------------------------------------------

#: KServe V2 / Open Inference Protocol (protos/grpc_predict_v2.proto).
INFERENCE_SERVICE = "inference.GRPCInferenceService"
#: mlmirror's ground-truth feedback service (protos/feedback.proto).
FEEDBACK_SERVICE = "mlmirror.v1.Feedback"
#: Envoy's external processing service, served in observer mode.
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

# --- KServe V2 methods (full gRPC paths) --------------------------------------------------------------------------

KSERVE_METHOD_PREFIX = f"/{INFERENCE_SERVICE}/"
MODEL_INFER = KSERVE_METHOD_PREFIX + "ModelInfer"
MODEL_METADATA = KSERVE_METHOD_PREFIX + "ModelMetadata"
MODEL_READY = KSERVE_METHOD_PREFIX + "ModelReady"
SERVER_LIVE = KSERVE_METHOD_PREFIX + "ServerLive"
SERVER_METADATA = KSERVE_METHOD_PREFIX + "ServerMetadata"
SERVER_READY = KSERVE_METHOD_PREFIX + "ServerReady"
MODEL_STREAM_INFER = KSERVE_METHOD_PREFIX + "ModelStreamInfer"  # Triton's streaming extension

# --- metadata ------------------------------------------------------------------------------------------------------

#: A call's id: read from the client when given, added to what goes upstream, returned in observed routes' trailers.
REQUEST_ID = "x-mlmirror-request-id"
#: Marks a copy sent to a shadow (its value: the shadow's name).
SHADOW = "x-mlmirror-shadow"
#: Trailer naming the upstream that answered a call (or ``STATIC_DEFAULT``).
SERVED_BY = "x-mlmirror-served-by"
#: The ``SERVED_BY`` value of an answer rendered from a route's static default.
STATIC_DEFAULT = "static-default"
#: Marks a call ``mlmirror replay`` sends to a candidate (value ``1``): not a client's.
REPLAY = "x-mlmirror-replay"
#: Envoy's request id; names a call observed through ext_proc when the client gave no ``REQUEST_ID``.
ENVOY_REQUEST_ID = "x-request-id"
#: Trace-context metadata (W3C Trace Context, gRPC's binary trace, Zipkin's B3): it names one call's span, so a
#: shadow copy that merges several calls carries none of it.
TRACE_METADATA = frozenset(
    {"traceparent", "tracestate", "grpc-trace-bin", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
     "x-b3-sampled", "x-b3-flags"}
)  # fmt: skip

#: Request metadata that describes one HTTP hop, not the call, and is never forwarded. (gRPC itself strips the
#: pseudo-headers, content-type, te and grpc-timeout; user-agent is the proxy's own on the upstream hop.)
HOP_BY_HOP_METADATA = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "user-agent",
    }
)

"""Configuration: the YAML file read once into frozen objects (``Config``, ``Route`` ...), every error located.

The schema (``schema``, ``schema_observing``: the dataclasses, their defaults and each key's description) is apart
from the readers (``reader``, ``read_route``, ``read_observers``: YAML to dataclasses, ``file:line: key: reason``
errors). The public surface is re-exported here, so callers need not know how they are split.
"""

from mlmirror.config.reader import load_config, parse_config
from mlmirror.config.schema import (
    CALL_TYPES,
    CLASSIFICATION_MODES,
    DEFAULT_FALLBACK_CODES,
    DEMOTE_TO,
    MODEL_INFER,
    MODES,
    CircuitPolicy,
    Compare,
    Config,
    HealthCheck,
    Keepalive,
    Observer,
    Promotion,
    Route,
    RouteMatch,
    Shadow,
    StaticResponse,
    StaticTensor,
    TlsClient,
    TlsServer,
    Upstream,
)
from mlmirror.config.schema_observing import (
    CAPTURE_INCLUDE,
    DRIFT_METHODS,
    Attribution,
    Capture,
    Drift,
    DriftFeature,
    GroundTruth,
    Multivariate,
)

__all__ = [
    "CALL_TYPES",
    "CAPTURE_INCLUDE",
    "CLASSIFICATION_MODES",
    "DEFAULT_FALLBACK_CODES",
    "DEMOTE_TO",
    "DRIFT_METHODS",
    "MODEL_INFER",
    "MODES",
    "Attribution",
    "Capture",
    "CircuitPolicy",
    "Compare",
    "Config",
    "Drift",
    "DriftFeature",
    "GroundTruth",
    "HealthCheck",
    "Keepalive",
    "Observer",
    "Multivariate",
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

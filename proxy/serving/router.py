"""Pure routing: (gRPC method, KServe model name) → the first route whose match accepts it.

Routes are tried in configuration order. A memo of recent answers makes the usual lookup one dictionary probe; it
is bounded because both method and model names come from clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from mlmirror.config import RouteMatch
from mlmirror.protocol.names import (
    MODEL_INFER,
    MODEL_METADATA,
    MODEL_READY,
    MODEL_STREAM_INFER,
    SERVER_LIVE,
    SERVER_METADATA,
    SERVER_READY,
)
from mlmirror.protocol.wire import read_string_field

__all__ = ["KNOWN_CALL_TYPES", "MODEL_SCOPED_METHODS", "Router", "matches"]

#: Methods whose request carries the model name in field 1 (ModelInferRequest.model_name, ModelReadyRequest.name,
#: ModelMetadataRequest.name).
MODEL_SCOPED_METHODS = frozenset({MODEL_INFER, MODEL_READY, MODEL_METADATA})

#: Call types known without configuration. Any other method is relayed as stream-stream, which carries every call
#: type correctly on the wire; ``method_types`` in the config lets a known-unary method take the faster unary path.
KNOWN_CALL_TYPES = {
    **dict.fromkeys(
        (SERVER_LIVE, SERVER_READY, MODEL_READY, SERVER_METADATA, MODEL_METADATA, MODEL_INFER), "unary_unary"
    ),
    MODEL_STREAM_INFER: "stream_stream",  # Triton's streaming extension
}

R = TypeVar("R")
_MEMO_LIMIT = 4096


def matches(match: RouteMatch, method: str, model: str | None) -> bool:
    """Whether ``match`` accepts a call of ``method`` for ``model`` (None when the method carries no model)."""
    if match.model is not None and match.model != model:
        return False
    if match.method is None:
        return True
    if match.method.endswith("/*"):
        return method.startswith(match.method[:-1])
    return match.method == method


class Router(Generic[R]):
    """Maps calls to routes of any type ``R``, given as (match, route) pairs in priority order."""

    def __init__(self, routes: Sequence[tuple[RouteMatch, R]]) -> None:
        self._routes = tuple(routes)
        self._reads_model = any(match.model is not None for match, _ in self._routes)
        self._memo: dict[tuple[str, str | None], R | None] = {}

    def model_of(self, method: str, request: bytes) -> str | None:
        """The KServe model name in ``request`` when routing needs it, else None (no scan at all)."""
        if self._reads_model and method in MODEL_SCOPED_METHODS:
            return read_string_field(request, 1)
        return None

    def route(self, method: str, model: str | None) -> R | None:
        """The first route that accepts the call, or None."""
        key = (method, model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = next((route for match, route in self._routes if matches(match, method, model)), None)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = found
        return found

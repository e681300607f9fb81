"""The exceptions mlmirror raises, in one tree.

    MlmirrorError
    ├── ConfigError        a configuration file is missing, unreadable or invalid; carries file, line and key
    ├── StartError         the proxy could not start: an address to bind is taken, a TLS file is unreadable
    ├── AdminError         a request to the admin endpoint failed (CLI side)
    └── ReplayError        a replay could not run: unreadable capture, unreachable target, bad gate file

gRPC errors from upstreams are not exceptions here: the handler relays them to the client as statuses
(see ``mlmirror.serving.handler``), and translates ``grpc.aio.AioRpcError`` in one place only.
"""

from __future__ import annotations

__all__ = ["AdminError", "ConfigError", "MlmirrorError", "ReplayError", "StartError"]


class MlmirrorError(Exception):
    """Base class of every error mlmirror raises on purpose."""


class ConfigError(MlmirrorError):
    """An invalid configuration, located in its file.

    Attributes:
        file: path of the YAML file (or ``<string>``).
        line: 1-based line of the offending node, or None when the whole file is at fault.
        key: dotted path of the offending key (``routes[0].primary``), or None.
        reason: what is wrong, in words.
    """

    def __init__(self, reason: str, *, file: str, line: int | None = None, key: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"


class StartError(MlmirrorError):
    """The proxy could not start serving; the message says what could not be bound or read."""


class AdminError(MlmirrorError):
    """The admin endpoint could not be reached or refused a request."""


class ReplayError(MlmirrorError):
    """``mlmirror replay`` could not run (exit 2): the message says what could not be read or reached."""

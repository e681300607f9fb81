"""mlmirror: a gRPC proxy that forwards inference calls to production, falls back gracefully, and watches models.

The command line is ``mlmirror`` (``proxy.cli``); the running proxy is ``proxy.server.Proxy``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

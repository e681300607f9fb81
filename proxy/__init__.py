"""mlmirror: a gRPC proxy that forwards inference calls to production, falls back gracefully, and watches models.

The command line is ``mlmirror`` (``mlmirror.cli.main``); the running proxy is ``mlmirror.runtime.proxy.Proxy``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

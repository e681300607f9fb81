"""Admin: the HTTP endpoint (``/metrics``, ``/status``, ``/readyz``, reload, promote, outcomes) and what it serves."""

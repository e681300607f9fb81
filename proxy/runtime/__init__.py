"""Running mlmirror: the proxy's lifecycle (start, reload, graceful stop) and the supervisor of worker processes."""

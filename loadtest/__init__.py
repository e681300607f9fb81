"""Load tests and benchmarks of the proxy: see ``loadtest/README.md``."""

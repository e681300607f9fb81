"""Capture: a sample of a route's calls written to rotating JSON-lines files of bounded total size."""

"""Atheris harness: the configuration loader takes any bytes and either parses them or raises ``ConfigError``
naming the file (never another exception).

    python tests/fuzz/fuzz_config.py -atheris_runs=200000

atheris is optional (``pip install atheris``); this file is not collected by pytest. Inputs are decoded as UTF-8
(undecodable bytes are what ``load_config`` reports as a ConfigError before parsing); a seed of the example config
gives the fuzzer valid structure to mutate.
"""

from __future__ import annotations

import sys

import atheris
import grpc  # noqa: F401 - imported before instrumenting: only mlmirror's own code is instrumented
import numpy  # noqa: F401
import yaml  # noqa: F401

with atheris.instrument_imports():
    from mlmirror.config import parse_config
    from mlmirror.errors import ConfigError


def one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        if exc.file != "fuzz.yaml":
            raise AssertionError(f"error names the wrong file: {exc}") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

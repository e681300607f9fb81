"""The benchmark scripts' arguments: what they accept and how they say what they do not."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loadtest.bench_observer import CONFIGURATIONS, configurations
from tests.support import REPO


def test_configurations_are_named_by_commas_even_one_whose_name_holds_a_comma():
    assert configurations("1 shadow, 100%,drift only") == ["1 shadow, 100%", "drift only"]
    assert configurations(",".join(CONFIGURATIONS)) == list(CONFIGURATIONS)
    with pytest.raises(argparse.ArgumentTypeError, match="'drift' is none of"):
        configurations("drift")


@pytest.mark.process
def test_bench_observer_help_names_every_configuration():
    done = subprocess.run([sys.executable, "-m", "loadtest.bench_observer", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert all(name in text for name in CONFIGURATIONS)

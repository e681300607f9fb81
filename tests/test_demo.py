"""``mlmirror demo`` tells its three-act story end to end, and the demo models answer as documented."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from mlmirror.demo.models import CLASS_MEANS, MODELS, sample_features

from tests.support import REPO


@pytest.mark.slow
def test_the_demo_runs_its_story_with_no_client_errors():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlmirror",
            "demo",
            "--duration",
            "9s",
            "--rate",
            "40",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--linger",
            "0s",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for line in ("act 1: production serves", "act 2: production goes down", "act 3: production is back"):
        assert line in out
    # The candidate shadows the iris route all along: the commentary and the closing table follow it.
    assert " | candidate agrees " in out
    table = out[out.index("shadows (mlmirror shadows):") :].splitlines()
    assert table[1].split()[:3] == ["ROUTE", "SHADOW", "%"]
    assert table[2].split()[:3] == ["iris", "candidate", "100"]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("done: ")
    assert ", 0 client errors; served by " in summary
    assert "production" in summary
    assert "baseline" in summary
    assert "candidate" in summary


def test_the_demo_models_classify_as_described():
    rng = np.random.default_rng(0)
    x = sample_features(rng, 3000)
    truth = np.argmin(((x[:, None, :] - CLASS_MEANS[None].astype(np.float32)) ** 2).sum(axis=2), axis=1)
    probabilities, production = MODELS["production"].predict(x)
    _, candidate = MODELS["candidate"].predict(x)
    _, baseline = MODELS["baseline"].predict(x)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert probabilities.dtype == np.float32
    assert (production == truth).mean() > 0.9
    disagreement = (production != candidate).mean()
    assert 0.01 < disagreement < 0.15  # a changed model, not a different one
    assert set(baseline) == {0}


@pytest.mark.slow
def test_the_demo_prints_its_dashboard_first_and_lingers_then_ends_by_itself():
    command = [sys.executable, "-m", "mlmirror", "demo", "--duration", "3s", "--rate", "20", "--listen",
               "127.0.0.1:0", "--admin", "127.0.0.1:0", "--linger", "2s"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dashboard: http://127.0.0.1:")
    address = lines[0].split()[1]
    assert lines[-1] == f"the dashboard stays up for 2s at {address} (Ctrl-C stops it)"

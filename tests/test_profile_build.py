"""``mlmirror profile build``: reference profiles from .npy, .npz and .csv files, and its errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from mlmirror import kernels
from mlmirror.observing.drift.reference import Reference

from tests.support import REPO

pytestmark = pytest.mark.process  # starts the CLI


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlmirror", "profile", "build", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_a_numpy_file_gives_quantile_edges_and_the_reference_counts(tmp_path):
    data = np.random.default_rng(0).normal(size=(2000, 3))
    np.save(tmp_path / "ref.npy", data)
    done = build("--data", str(tmp_path / "ref.npy"), "--out", str(tmp_path / "p.npz"), "--bins", "8",
                 "--model", "iris", "--model-version", "3", "--names", "a,b,c")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2000 rows, 3 series (a, b, c), 8 bins" in done.stdout
    profile = Reference.load(tmp_path / "p.npz")
    assert profile.schema.names() == ["a", "b", "c"]
    assert (profile.model, profile.version, profile.counts.rows) == ("iris", "3", 2000)
    np.testing.assert_array_equal(profile.edges, kernels.quantile_edges(data, 8))
    for f in range(3):  # every row in a bin; the quantile bins hold ~equal shares
        inside = profile.counts.numeric[f, 1:9]
        assert inside.sum() == 2000
        assert inside.min() >= 240


def test_a_csv_file_has_numeric_and_categorical_columns(tmp_path):
    rows = ["x,colour"] + [f"{i / 10},{'red' if i % 10 < 7 else 'blue'}" for i in range(100)]
    (tmp_path / "ref.csv").write_text("\n".join(rows) + "\n")
    done = build("--data", str(tmp_path / "ref.csv"), "--out", str(tmp_path / "p.npz"), "--bins", "4")
    assert done.returncode == 0, done.stderr
    profile = Reference.load(tmp_path / "p.npz")
    assert [(s.name, s.categorical) for s in profile.schema.series] == [("x", False), ("colour", True)]
    assert profile.vocabularies == [{b"red": 0, b"blue": 1}]
    assert profile.counts.categorical[0].tolist() == [[70, 30, 0]]


def test_an_npz_file_names_series_by_tensor(tmp_path):
    np.savez(tmp_path / "ref.npz", input=np.ones((50, 2)), colour=np.array(["a", "b"] * 25))
    done = build("--data", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "p.npz"))
    assert done.returncode == 0, done.stderr
    profile = Reference.load(tmp_path / "p.npz")
    assert profile.schema.names() == ["input[0]", "input[1]", "colour"]


def test_bad_data_files_are_clear_errors(tmp_path):
    (tmp_path / "data.txt").write_text("1 2 3\n")
    (tmp_path / "empty.csv").write_text("")
    np.save(tmp_path / "ref.npy", np.ones((5, 2)))
    cases = {
        "missing": (["--data", str(tmp_path / "nope.csv")], "No such file"),
        "format": (["--data", str(tmp_path / "data.txt")], "unknown data format '.txt'"),
        "empty": (["--data", str(tmp_path / "empty.csv")], "empty CSV file"),
        "names": (["--data", str(tmp_path / "ref.npy"), "--names", "a"], "--names gives 1 names for 2 columns"),
    }
    for what, (args, message) in cases.items():
        done = build(*args, "--out", str(tmp_path / "p.npz"))
        assert done.returncode == 1, what
        assert message in done.stderr, (what, done.stderr)

"""A test that starts a child process must be marked process (or slow): `make check` relies on the marks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.process


def test_an_unmarked_test_that_starts_a_process_is_an_error(tmp_path: Path):
    folder = tmp_path / "tests"
    folder.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "test_spawning.py").write_text(
        textwrap.dedent(
            """
            import subprocess
            import sys

            import pytest

            def test_unmarked_spawns():
                subprocess.run([sys.executable, "-c", "pass"], check=True)

            @pytest.mark.process
            def test_marked_spawns():
                subprocess.run([sys.executable, "-c", "pass"], check=True)

            def test_unmarked_stays_in_process():
                assert sum(range(4)) == 6
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "markers=process: starts one", "tests"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "3 passed, 1 error" in run.stdout, run.stdout
    assert "ERROR at teardown of test_unmarked_spawns" in run.stdout, run.stdout
    assert "mark the test process" in run.stdout

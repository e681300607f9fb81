"""The wheel: one top-level package, ``mlmirror``, typed, with its kernels and its .proto files, and it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tests.support import REPO

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources: a build in the checkout would leave build/ behind, whose stale
    copies of removed modules a later build packs again."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("proxy", "kernels", "protos"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr
    (built,) = out.glob("mlmirror-*.whl")
    return built


def test_the_wheel_holds_one_typed_package_with_kernels_and_protos(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"mlmirror"}
    for expected in (
        "mlmirror/py.typed",
        "mlmirror/kernels/__init__.py",
        "mlmirror/kernels/divergence.py",
        "mlmirror/protos/__init__.py",
        "mlmirror/protos/grpc_predict_v2.proto",
        "mlmirror/protos/feedback.proto",
        "mlmirror/serving/handler.py",
        "mlmirror/admin/ui/index.html",  # the dashboard's assets are package data
        "mlmirror/admin/ui/app.js",
        "mlmirror/admin/ui/app.css",
        "mlmirror/admin/ui/vendor/uPlot.iife.min.js",
        "mlmirror/admin/ui/vendor/uPlot.min.css",
        "mlmirror/admin/ui/vendor/uPlot.LICENSE",
    ):
        assert expected in names
    assert not [name for name in names if "__pycache__" in name or name.startswith("mlmirror/tests")]
    # Every subpackage of the source is in the wheel (pyproject.toml lists them one by one).
    for folder, package in (("proxy", "mlmirror"), ("kernels", "mlmirror/kernels"), ("protos", "mlmirror/protos")):
        for init in (REPO / folder).rglob("__init__.py"):
            assert str(PurePosixPath(package, init.relative_to(REPO / folder).as_posix())) in names


def test_the_unpacked_wheel_runs_and_compiles_its_protos(wheel: Path, tmp_path: Path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    # Run from the unpacked wheel, not from the checkout: its folder comes first on the path, and the check below
    # imports the protos (compiled from the .proto files in the wheel) and says where mlmirror was found.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlmirror, mlmirror.protos as p; print(mlmirror.__file__, "
            "p.inference_pb2.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(tmp_path / "mlmirror" / "__init__.py"), "inference.GRPCInferenceService"]
    cli = subprocess.run(
        [sys.executable, "-m", "mlmirror", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert cli.returncode == 0, cli.stderr
    assert "usage: mlmirror" in cli.stdout

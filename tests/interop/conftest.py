"""Session fixtures: each real server kind starts once (from its own venv, created on first use) and serves
every interop test; see servers.py for how each one is run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.interop import peers, servers
from tests.interop.servers import Peer

KINDS = ("mlserver", "triton", "kserve")
DECLARED = [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


def _reference_data(folder: Path) -> Path:
    """The Triton and KServe models' 'training data': seeded standard normal rows, [3000, 4] FP32."""
    path = folder / "train.npy"
    np.save(path, np.random.default_rng(5).normal(size=(3000, 4)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def mlserver_peer(interop_dir: Path) -> Iterator[Peer]:
    peers.ensure("mlserver")
    folder = interop_dir / "mlserver"
    trained = folder / "trained"
    servers.train_sklearn(trained)

    def repository(name: str, version: str) -> Path:
        joblib = trained / f"{version}.joblib"
        # "iris" declares its input in model-settings.json; "iris-bare" is the same model without any.
        return servers.mlserver_repository(folder / name, {"iris": (joblib, version, DECLARED),
                                                           "iris-bare": (joblib, version, None)})  # fmt: skip

    @contextlib.contextmanager
    def victim(name: str) -> Iterator[servers.Server]:
        with servers.mlserver(name, repository(name, "v1"), folder) as server:
            yield server

    with (servers.mlserver("mlserver-v1", repository("repo-v1", "v1"), folder) as primary,
          servers.mlserver("mlserver-v2", repository("repo-v2", "v2"), folder) as shadow):  # fmt: skip
        yield Peer("mlserver", "iris", "features", "predict_proba", ("predict_proba",), primary, shadow, victim,
                   trained / "train.npy", folder)  # fmt: skip


@pytest.fixture(scope="session")
def triton_peer(interop_dir: Path) -> Iterator[Peer]:
    peers.ensure("triton")
    problems = peers.check_system()
    assert not problems, problems
    folder = interop_dir / "triton"

    @contextlib.contextmanager
    def victim(name: str) -> Iterator[servers.Server]:
        with servers.triton(name, servers.triton_repository(folder / name, "linear", 1, "input-0"), folder) as s:
            yield s

    with (servers.triton("triton-v1", servers.triton_repository(folder / "repo-v1", "linear", 1, "input-0"),
                         folder) as primary,
          servers.triton("triton-v2", servers.triton_repository(folder / "repo-v2", "linear", 2, "input-0"),
                         folder) as shadow):  # fmt: skip
        yield Peer("triton", "linear", "input-0", "probabilities", (), primary, shadow, victim,
                   _reference_data(folder), folder)  # fmt: skip


@pytest.fixture(scope="session")
def kserve_peer(interop_dir: Path) -> Iterator[Peer]:
    peers.ensure("kserve")
    folder = interop_dir / "kserve"

    @contextlib.contextmanager
    def victim(name: str) -> Iterator[servers.Server]:
        with servers.kserve(name, "linear", 1, "input-0", folder) as server:
            yield server

    with (servers.kserve("kserve-v1", "linear", 1, "input-0", folder) as primary,
          servers.kserve("kserve-v2", "linear", 2, "input-0", folder) as shadow):  # fmt: skip
        yield Peer("kserve", "linear", "input-0", "probabilities", (), primary, shadow, victim,
                   _reference_data(folder), folder)  # fmt: skip


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest) -> Peer:
    return request.getfixturevalue(f"{request.param}_peer")

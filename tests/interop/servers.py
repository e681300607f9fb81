"""The real model servers as subprocesses on 127.0.0.1, each run from its own venv (see peers.py): MLServer with
scikit-learn models, Triton with a Python-backend model, KServe's Python ModelServer with a numpy model.

Ports are free loopback ports picked just before the start (none of these servers tells which port it bound when
given 0); a server that loses the race fails to start, and the start is tried again on new ports. Every process
runs in a session of its own and is killed with its whole group when its ``with`` block ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.interop import peers

MODELS = Path(__file__).resolve().parent / "models"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A server process with its output in ``<folder>/<name>.log``."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    @classmethod
    @contextlib.contextmanager
    def start(cls, name: str, command: list[str], folder: Path, env: dict | None = None,
              cwd: Path | None = None) -> Iterator[Process]:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{name}.log"
        with log.open("ab") as output:
            popen = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)  # fmt: skip
        process = cls(name, popen, log)
        try:
            yield process
        finally:
            process.kill()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything in its session (Triton's backend stubs, MLServer's workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=30)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ExitedError(AssertionError):
    pass


def wait_for(condition: Callable[[], object], within: float, what: str, process: Process | None = None) -> object:
    """Poll ``condition`` until it is truthy (returned); fail after ``within`` seconds, or at once when ``process``
    exits, with the end of its log."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if process is not None and not process.alive():
            raise ExitedError(f"{process.name} exited ({process.popen.returncode}) before {what}:\n{process.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{process.tail()}" if process is not None else ""
            raise AssertionError(f"timed out after {within:g}s waiting for {what}{tail}")
        time.sleep(0.1)


@dataclass
class Server:
    """A model server running: its gRPC address and its process."""

    name: str
    grpc_port: int
    process: Process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@contextlib.contextmanager
def _serve(name: str, folder: Path, within: float, attempt: Callable[[dict[str, int]], tuple[list[str], dict | None]],
           ports: tuple[str, ...], cwd: Path | None = None) -> Iterator[Server]:  # fmt: skip
    """Start a server on fresh free ports until one start comes up (a lost port race exits it early)."""
    for tries in range(3):
        chosen = {p: free_port() for p in ports}
        command, env = attempt(chosen)
        with Process.start(name, command, folder, env=env, cwd=cwd) as process:
            try:
                wait_for(lambda: listening(chosen["grpc"]), within, f"{name} to listen", process)  # noqa: B023
            except ExitedError:
                if tries == 2 or "in use" not in process.tail().lower():
                    raise
                continue
            yield Server(name, chosen["grpc"], process)
            return


# --- MLServer -------------------------------------------------------------------------------------------------


def train_sklearn(folder: Path) -> dict:
    """Train the two scikit-learn model versions in the MLServer venv: ``folder`` gets train.npy, v1.joblib,
    v2.joblib. Returns what the script printed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(peers.python("mlserver")), str(MODELS / "train_sklearn.py"), str(folder)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def mlserver_repository(folder: Path, models: dict[str, tuple[Path, str, list[dict] | None]]) -> Path:
    """An MLServer model folder: ``models`` maps a model name to (joblib file, version, declared inputs or None)."""
    for name, (joblib, version, inputs) in models.items():
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(joblib, target / "model.joblib")
        settings = {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": version}}  # fmt: skip
        if inputs is not None:
            settings["inputs"] = inputs
        (target / "model-settings.json").write_text(json.dumps(settings))
    return folder


@contextlib.contextmanager
def mlserver(name: str, repository: Path, folder: Path) -> Iterator[Server]:
    """``mlserver start`` on ``repository``, inference in the main process (``parallel_workers: 0``)."""

    def attempt(ports: dict[str, int]) -> tuple[list[str], dict]:
        settings = {"debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": ports["http"],
                    "grpc_port": ports["grpc"], "metrics_port": ports["metrics"]}  # fmt: skip
        (repository / "settings.json").write_text(json.dumps(settings))
        return [str(peers.venv_dir("mlserver") / "bin" / "mlserver"), "start", str(repository)], _env()

    with _serve(name, folder, 120, attempt, ("grpc", "http", "metrics")) as server:
        yield server


# --- Triton ---------------------------------------------------------------------------------------------------


def linear_weights(variant: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed linear classifier (4 features, 3 classes) served by Triton and KServe; variant 2 is variant 1
    nudged, so the two versions disagree on a few percent of rows."""
    rng = np.random.default_rng(11)
    w, b = rng.normal(size=(4, 3)), rng.normal(scale=0.3, size=3)
    if variant == 2:
        nudge = np.random.default_rng(12)
        w, b = w + nudge.normal(scale=0.15, size=w.shape), b + nudge.normal(scale=0.1, size=b.shape)
    return w.astype(np.float32), b.astype(np.float32)


def triton_repository(folder: Path, model: str, variant: int, input_name: str) -> Path:
    """A Triton model repository with one Python-backend model ``model``, version ``variant``."""
    version = folder / model / str(variant)
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS / "triton_linear.py", version / "model.py")
    w, b = linear_weights(variant)
    np.savez(version / "weights.npz", w=w, b=b)
    (folder / model / "config.pbtxt").write_text(f"""\
name: "{model}"
backend: "python"
max_batch_size: 0
input [ {{ name: "{input_name}" data_type: TYPE_FP32 dims: [ -1, 4 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 3 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters: {{ key: "input_name" value: {{ string_value: "{input_name}" }} }}
""")
    return folder


@contextlib.contextmanager
def triton(name: str, repository: Path, folder: Path) -> Iterator[Server]:
    """``tritonserver`` (from the nvidia-pytriton wheel) on CPU, gRPC and HTTP on loopback, metrics off."""
    dist = peers.triton_dist()
    env = _env()
    # The binary and the stub find their libraries through their RUNPATH; the path is set as pytriton sets it.
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))

    def attempt(ports: dict[str, int]) -> tuple[list[str], dict]:
        return [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={dist / 'backends'}",
            f"--cache-directory={dist / 'caches'}",
            "--grpc-address=127.0.0.1", f"--grpc-port={ports['grpc']}",
            "--allow-http=true", "--http-address=127.0.0.1", f"--http-port={ports['http']}",
            "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--log-verbose=0",
            "--pinned-memory-pool-byte-size=0",
        ], env  # fmt: skip

    with _serve(name, folder, 120, attempt, ("grpc", "http")) as server:
        yield server


def triton_descriptors(out: Path) -> Path:
    """Triton's whole gRPC service (grpc_service.proto and model_config.proto, as tritonclient ships them
    compiled) written as a FileDescriptorSet by the triton venv's Python; see harness.load_messages."""
    if not out.exists():
        done = subprocess.run([str(peers.python("triton")), str(MODELS / "triton_descriptors.py"), str(out)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    return out


# --- KServe ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def kserve(name: str, model: str, variant: int, input_name: str, folder: Path) -> Iterator[Server]:
    """KServe's Python ModelServer with the linear classifier (models/kserve_linear.py), REST and gRPC v2."""
    folder.mkdir(parents=True, exist_ok=True)
    w, b = linear_weights(variant)
    weights = folder / f"{name}-weights.npz"
    np.savez(weights, w=w, b=b)

    def attempt(ports: dict[str, int]) -> tuple[list[str], dict]:
        return [
            str(peers.python("kserve")), str(MODELS / "kserve_linear.py"),
            f"--model_name={model}", f"--weights={weights}", f"--version={variant}", f"--input_name={input_name}",
            f"--http_port={ports['http']}", f"--grpc_port={ports['grpc']}", "--workers=1",
        ], _env()  # fmt: skip

    with _serve(name, folder, 120, attempt, ("grpc", "http")) as server:
        yield server


def _env() -> dict[str, str]:
    """The environment of a server process: ours, minus what would leak mlmirror's venv into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- What the tests see of a server kind -----------------------------------------------------------------------


@dataclass
class Peer:
    """One kind of real server, started for the session: the model (version 1) on ``primary``, version 2 of the
    same model name on ``shadow``; ``victim()`` starts one more version-1 server, for tests that kill it."""

    kind: str
    model: str
    input_name: str
    output: str  # the [n, 3] FP32 class-probabilities output
    request_outputs: tuple[str, ...]  # outputs the request must name to get ``output`` (MLServer: predict_proba)
    primary: Server
    shadow: Server
    victim: Callable[[str], contextlib.AbstractContextManager[Server]]
    train: Path  # the training data, [n, 4] FP32 .npy: the drift reference
    folder: Path

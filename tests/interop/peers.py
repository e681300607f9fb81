"""Virtual environments for the real model servers the interop tests run against.

Each server lives in its own venv under ``.venv-peers/<name>`` at the repository root: their protobuf and grpcio
pins conflict with mlmirror's, so none of them is installed beside mlmirror. A venv is made once; a stamp file
holding its recipe marks it complete, so a second call costs nothing and a changed recipe rebuilds it.

    python tests/interop/peers.py            # create every peer venv (CI runs this before pytest)
    python tests/interop/peers.py triton     # just one

Standard library only: this runs before mlmirror's own venv matters, and the tests' fixtures call ``ensure``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / ".venv-peers"
STAMP = ".peer-stamp.json"

# What each venv holds. Changing a recipe rebuilds that venv on next use.
RECIPES: dict[str, list[str]] = {
    # MLServer 1.7 and its scikit-learn runtime (scikit-learn comes with it); the models are trained in this venv.
    "mlserver": ["mlserver==1.7.*", "mlserver-sklearn==1.7.*"],
    # The tritonserver binary and its Python backend ship inside the nvidia-pytriton wheel; tritonclient comes
    # with it, and its generated stubs describe Triton's whole GRPCInferenceService.
    "triton": ["nvidia-pytriton==0.7.*"],
    # KServe's Python ModelServer (REST and the gRPC v2 endpoint).
    "kserve": ["kserve==0.21.*"],
}


def venv_dir(name: str) -> Path:
    return ROOT / name


def python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def _recipe(name: str) -> dict:
    return {"packages": RECIPES[name], "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "layout": 1}


def _complete(name: str) -> bool:
    try:
        return json.loads((venv_dir(name) / STAMP).read_text()) == _recipe(name)
    except (OSError, ValueError):
        return False


def triton_dist(name: str = "triton") -> Path:
    """pytriton's ``tritonserver`` folder (bin/, backends/, caches/, python_backend_stubs/) in the triton venv."""
    found = sorted(venv_dir(name).glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not found:
        raise RuntimeError(f"no pytriton/tritonserver in {venv_dir(name)}")
    return found[0]


def triton_stub_python() -> str:
    """The Python version the Triton Python backend stub embeds: the system's ``python3`` (it links the system
    libpython and imports numpy from the system's site-packages, so Debian's python3-numpy must be installed)."""
    out = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _finish_triton(name: str) -> None:
    """Put the stub for the system Python where the Python backend looks for it (backends/python/), as pytriton
    does at run time."""
    dist = triton_dist(name)
    stub = dist / "python_backend_stubs" / triton_stub_python() / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"pytriton ships no backend stub for the system Python {triton_stub_python()}: {stub}")
    shutil.copy2(stub, dist / "backends" / "python" / "triton_python_backend_stub")


def _quiet_pip_output(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "is ignored: it is neither a file" not in line)


def ensure(name: str, log=None) -> Path:
    """Create the venv ``name`` unless its stamp says it is complete; return its folder. Safe to call from
    several processes at once (a lock file serializes them)."""
    if _complete(name):
        return venv_dir(name)
    ROOT.mkdir(exist_ok=True)
    with (ROOT / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(name):
            return venv_dir(name)
        started = time.monotonic()
        target = venv_dir(name)
        if target.exists():
            shutil.rmtree(target)
        # The venv is made from the Python running this (3.11, like mlmirror's); its pip is the base one.
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(python(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        done = subprocess.run([*pip, *RECIPES[name]], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(RECIPES[name])} failed:\n{_quiet_pip_output(done.stderr)}")
        if name == "triton":
            _finish_triton(name)
        (target / STAMP).write_text(json.dumps(_recipe(name)))
        if log is not None:
            print(f"peer venv {name}: created in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return venv_dir(name)


def check_system() -> list[str]:
    """What the machine lacks for the peers (what Triton's Python backend stub needs of the system), as messages."""
    problems = []
    if subprocess.run(["/usr/bin/python3", "-c", "import numpy"], capture_output=True).returncode != 0:
        problems.append(
            "the system python3 has no numpy (Triton's Python backend needs it): apt-get install python3-numpy"
        )
    if _complete("triton"):
        stub = triton_dist() / "backends" / "python" / "triton_python_backend_stub"
        linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True).stdout
        missing = [line.split()[0] for line in linked.splitlines() if "not found" in line]
        if missing:
            problems.append(f"Triton's Python backend stub lacks {', '.join(missing)} (Debian: libpython3.11)")
    return problems


def main(argv: list[str]) -> int:
    names = argv or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown peer(s): {', '.join(unknown)} (known: {', '.join(RECIPES)})", file=sys.stderr)
        return 2
    for name in names:
        started = time.monotonic()
        ensure(name, log=sys.stdout)
        print(f"peer venv {name}: ready ({time.monotonic() - started:.0f}s) at {venv_dir(name)}", flush=True)
    problems = check_system()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))

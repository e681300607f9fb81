"""``python -m loadtest``: ghz JSON configurations in, ghz-format JSON reports out (the built-in generator, as ghz
is not installable here), against a real model server; and the comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.ghz import load_config
from loadtest.ports import free_port, wait_for_port
from tests.support import REPO

CONFIGS = sorted((REPO / "loadtest" / "ghz").glob("*.json"))


def test_the_shipped_configurations_load():
    assert {path.stem for path in CONFIGS} == {"direct", "through-mlmirror", "with-shadows", "through-envoy"}
    for path in CONFIGS:
        config = load_config(path)
        assert config.method == "/inference.GRPCInferenceService/ModelInfer"
        assert config.request == (REPO / "loadtest" / "ghz" / "modelinfer.bin").read_bytes()


def loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)  # fmt: skip


@pytest.mark.process
def test_a_run_writes_a_ghz_format_report_and_compare_tabulates_it(tmp_path: Path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlmirror", "model-server", "--listen", f"127.0.0.1:{port}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        config = json.loads((REPO / "loadtest" / "ghz" / "direct.json").read_text())
        config.update(host=f"127.0.0.1:{port}", total=300, concurrency=4, rps=0, name="direct-test")
        config["binary-file"] = str(REPO / "loadtest" / "ghz" / "modelinfer.bin")
        (tmp_path / "direct.json").write_text(json.dumps(config))
        done = loadtest("run", str(tmp_path / "direct.json"), "--no-ghz", "--out", str(tmp_path / "report.json"),
                        "--pid", str(server.pid))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "300/300" in done.stderr  # the progress bar
    finally:
        server.terminate()
        server.wait(timeout=10)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["name"] == "direct-test"
    assert report["generator"] == "mlmirror-asyncio"
    assert report["count"] == 300
    assert report["statusCodeDistribution"] == {"OK": 300}
    assert report["errorDistribution"] == {}
    latencies = [d["latency"] for d in report["latencyDistribution"]]
    assert [d["percentage"] for d in report["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert latencies == sorted(latencies)
    assert report["fastest"] <= latencies[0] <= latencies[-1] <= report["slowest"]  # nanoseconds
    assert 1e4 < report["average"] < 1e9
    assert report["total"] > report["slowest"]
    assert report["rps"] == pytest.approx(300 / (report["total"] / 1e9), rel=1e-6)
    assert sum(bucket["count"] for bucket in report["histogram"]) == 300
    assert report["cpuPerCallMicros"] > 0
    table = loadtest("compare", str(tmp_path / "report.json"), str(tmp_path / "report.json"))
    assert table.returncode == 0, table.stderr
    header, _, row, _ = table.stdout.splitlines()
    assert header.startswith("| run | generator | calls | OK | calls/s | p50 (ms) | p90 (ms) | p99 (ms)")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["direct-test", "mlmirror-asyncio", "300", "300"]


@pytest.mark.process
def test_an_unreachable_host_is_reported_as_errors_and_a_bad_config_clearly(tmp_path: Path):
    config = json.loads((REPO / "loadtest" / "ghz" / "direct.json").read_text())
    config.update(host="127.0.0.1:1", total=5, rps=0, timeout="1s")
    config["binary-file"] = str(REPO / "loadtest" / "ghz" / "modelinfer.bin")
    (tmp_path / "down.json").write_text(json.dumps(config))
    done = loadtest("run", str(tmp_path / "down.json"), "--no-ghz", "--quiet")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["statusCodeDistribution"] == {"UNAVAILABLE": 5}
    config.pop("binary-file")
    (tmp_path / "bad.json").write_text(json.dumps(config))
    bad = loadtest("run", str(tmp_path / "bad.json"), "--no-ghz")
    assert bad.returncode == 1
    assert "binary-file: the serialized request is required" in bad.stderr

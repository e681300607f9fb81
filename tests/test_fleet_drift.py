"""Fleet-wide drift with a real Prometheus: two mlmirror replicas sharing one reference profile export their bins,
Prometheus scrapes both, and its recording rules' PSI and JS over the summed counts equal mlmirror's own kernels on
the merged counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror import kernels
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.observing.drift.profile_build import build_profile

from loadtest.ports import free_port
from loadtest.processes import stop_process
from tests.support import REPO, iris_config, model_server, running_proxy, wait_until

pytestmark = pytest.mark.process  # starts Prometheus

FLEET_RULES = REPO / "deploy" / "prometheus" / "mlmirror-fleet-rules.yml"


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]):
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus (Debian package prometheus) is needed; .ci/run installs it"
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        textwrap.dedent(f"""
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        rule_files: [{FLEET_RULES}]
        scrape_configs:
          - job_name: mlmirror
            static_configs: [{{targets: {json.dumps(targets)}}}]
    """)
    )
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
        if process.stderr is not None:
            process.stderr.close()


def query(base: str, expression: str) -> dict[tuple[str, str], float]:
    """{(series, version): value} of an instant query; {} while Prometheus is not answering yet."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except OSError:
        return {}
    return {(r["metric"]["series"], r["metric"]["version"]): float(r["value"][1]) for r in answer["data"]["result"]}


async def test_fleet_psi_and_js_from_prometheus_equal_mlmirror_on_the_merged_counts(tmp_path: Path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ref.npy", sample_features(rng, 2000).astype(np.float64))
    profile = tmp_path / "profile.npz"
    build_profile(tmp_path / "ref.npy", profile, bins=8, model="iris", version="1", input_name="input", names=None)
    exported = ["input[0]", "input[2]"]
    async with model_server("production") as production:
        config = iris_config(
            production, f"drift: {{profile: {profile}, window: 100, export_bins: {json.dumps(exported)}}}"
        )
        async with running_proxy(config) as a, running_proxy(config) as b:
            for proxy, shift in ((a, 1.0), (b, 0.0)):  # one replica sees drifting petals, the other does not
                async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    await asyncio.gather(
                        *(infer(infer_request(sample_features(rng, 1, shift=shift))) for _ in range(100))
                    )
                engine = proxy.parts.get("iris", "drift").engine
                await wait_until(lambda e=engine: e.windows.get(("iris", "1")) == 1, what="a window")
            engines = [a.parts.get("iris", "drift").engine, b.parts.get("iris", "drift").engine]
            reference = engines[0].reference
            assert reference is not None
            merged = engines[0].latest_counts["iris", "1"].numeric + engines[1].latest_counts["iris", "1"].numeric
            names = reference.schema.names()
            rows = [names.index(name) for name in exported]
            expected_psi = kernels.psi(reference.counts.numeric[rows, :-1], merged[rows, :-1])
            expected_js = kernels.js(reference.counts.numeric[rows, :-1], merged[rows, :-1])
            targets = [f"127.0.0.1:{a.admin_port}", f"127.0.0.1:{b.admin_port}"]
            with prometheus(tmp_path, targets) as base:
                got: dict[str, dict[tuple[str, str], float]] = {}

                def ready() -> bool:
                    got["psi"] = query(base, "mlmirror:fleet_drift_psi")
                    got["js"] = query(base, "mlmirror:fleet_drift_js")
                    shares = query(base, 'count by (series, version) (mlmirror_drift_window_bins{series="input[0]"})')
                    both = query(base, "count by (series, version) (count by (series, version, instance) "
                                       '(mlmirror_drift_window_bins{series="input[0]"}))')  # fmt: skip
                    return len(got["psi"]) == 2 and len(got["js"]) == 2 and bool(shares) and both.get(
                        ("input[0]", "1")) == 2  # fmt: skip

                await wait_until(ready, within=60, what="Prometheus to scrape both replicas and evaluate the rules")
                await asyncio.sleep(2.5)  # one more evaluation, certainly after both scrapes
                ready()
    for i, name in enumerate(exported):
        assert got["psi"][name, "1"] == pytest.approx(expected_psi[i], rel=1e-9, abs=1e-12), name
        assert got["js"][name, "1"] == pytest.approx(expected_js[i], rel=1e-9, abs=1e-12), name
    psi = dict(zip(exported, expected_psi, strict=True))
    assert psi["input[2]"] > 0.2 > psi["input[0]"]  # the drifting feature shows through the fleet's sum

"""deploy/kubernetes/mlmirror.yaml: its mlmirror config parses, and its timings let a rolling update lose no call
(docs/RELIABILITY.md): the readiness probe is /readyz on the admin port, the grace period covers shutdown_delay +
shutdown_grace and the observer's stop, and the model server outlives mlmirror's drain."""

from __future__ import annotations

from pathlib import Path

import yaml
from mlmirror.config import parse_config

from tests.support import REPO

MANIFEST = REPO / "deploy" / "kubernetes" / "mlmirror.yaml"


def test_the_kubernetes_manifest_fits_mlmirrors_shutdown(tmp_path: Path):
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8"))}
    token = tmp_path / "admin-token"  # the Secret the pod mounts
    token.write_text("secret\n")
    text = documents["ConfigMap"]["data"]["mlmirror.yaml"].replace("/etc/mlmirror-secrets/admin-token", str(token))
    config = parse_config(text, str(MANIFEST))
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    proxy = containers["mlmirror"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert config.admin == f"0.0.0.0:{ports['admin']}"
    assert config.listen == f"0.0.0.0:{ports['grpc']}"
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    pre_stop = proxy.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert config.shutdown_delay >= 2.0  # time for the endpoints to change
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.shutdown_delay + config.shutdown_grace + 5
    model_sleep = containers["model-server"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert model_sleep >= pre_stop + config.shutdown_delay + config.shutdown_grace
    assert model_sleep < pod["terminationGracePeriodSeconds"]

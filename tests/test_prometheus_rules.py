"""The Prometheus rules in deploy/prometheus: valid (promtool check rules), behaving as their unit tests say
(promtool test rules), and — with the Grafana dashboard in deploy/grafana — naming only metrics a live mlmirror
really exports. (Grafana itself is not installable here; its dashboard is checked as JSON and by its queries.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, exposition_with_every_metric

RULES = REPO / "deploy" / "prometheus" / "mlmirror-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "mlmirror-rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool (Debian package prometheus) is needed; .ci/run installs it"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.process
def test_the_rules_are_valid():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 21 rules found" in checked.stdout


@pytest.mark.process
def test_the_rules_pass_their_unit_tests():
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


DASHBOARD = REPO / "deploy" / "grafana" / "mlmirror-dashboard.json"


async def test_every_metric_the_rules_and_the_dashboard_use_is_exported_by_a_live_proxy(tmp_path):
    rule_names = set(re.findall(r"\b(mlmirror_[a-z0-9_]+)", RULES.read_text()))
    assert len(rule_names) >= 12
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 11
    panel_names = {name for query in queries for name in re.findall(r"\b(mlmirror_[a-z0-9_]+)", query)}
    recorded = set(re.findall(r"record: (mlmirror:[a-z0-9_:]+)", RULES.read_text()))
    used_records = {name for query in queries for name in re.findall(r"\b(mlmirror:[a-z0-9_:]+)", query)}
    assert used_records <= recorded, f"the dashboard uses recording rules that do not exist: {used_records - recorded}"
    names = rule_names | panel_names
    body = await exposition_with_every_metric(tmp_path)
    families = list(text_string_to_metric_families(body))
    exported = {sample.name for family in families for sample in family.samples} | {f.name for f in families}
    # A counter with no sample yet (no decode error, say) is still exported, under its name with _total.
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}
    missing = sorted(name for name in names if name not in exported)
    assert missing == [], f"the rules or the dashboard use metrics that mlmirror does not export: {missing}"


@pytest.mark.process
def test_the_dashboard_queries_are_valid_promql(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # promtool parses PromQL when it checks rules: each query becomes a recording rule ($__rate_interval: Grafana's).
    rules = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
        f"      - record: dashboard:query{i}\n        expr: {json.dumps(q.replace('$__rate_interval', '5m'))}\n"
        for i, q in enumerate(queries)
    )
    (tmp_path / "dashboard-rules.yml").write_text(rules)
    checked = promtool("check", "rules", str(tmp_path / "dashboard-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout

"""The PrometheusRule and the Grafana dashboard of k8s/components/monitoring: promtool accepts the
rules and their unit tests pass (each alert fires on synthetic series of its failure), and both
overlays wire the scrape targets the PodMonitors name."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s.manifests import OVERLAYS, build, container_env, named_ports, pod_spec

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "components" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
DASHBOARD = MONITORING / "dashboards" / "shop-mesh.json"
RULE_TESTS = Path(__file__).with_name("rules.test.yaml")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)


def rule_groups() -> dict[str, object]:
    """The PrometheusRule's spec as a plain Prometheus rules file."""
    return {"groups": yaml.safe_load(RULES.read_text())["spec"]["groups"]}


def write_rules(tmp_path: Path) -> Path:
    path = tmp_path / "shop-mesh.rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    return path


@needs_promtool
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    assert promtool is not None
    proc = subprocess.run(
        [promtool, "check", "rules", str(write_rules(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 15 rules found" in proc.stdout


@needs_promtool
def test_alerts_fire_on_synthetic_failures(tmp_path: Path) -> None:
    assert promtool is not None
    rules = write_rules(tmp_path)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    path = tmp_path / "rules.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every alert the rules define is exercised by a firing case.
    alerts = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r}  # type: ignore[attr-defined]
    firing = {
        case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    assert alerts == firing


@needs_promtool
def test_promtool_really_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a syntax error is refused."""
    assert promtool is not None
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(("}]}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_expose_what_the_pod_monitors_scrape(overlay: str) -> None:
    built = build(f"overlays/{overlay}")
    monitors = {m["metadata"]["name"]: m for m in built.of_kind("PodMonitor")}
    assert set(monitors) == {"shop-apps", "shop-envoy", "shop-linkerd-proxy"}
    app_port = monitors["shop-apps"]["spec"]["podMetricsEndpoints"][0]["port"]
    for deployment in built.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        ports = named_ports(deployment)
        if labels.get("app.kubernetes.io/component") == "grpc-service":
            app = pod_spec(deployment)["containers"][0]
            env = container_env(built, app)
            # The app serves metrics on the port the PodMonitor and the annotations name.
            assert ports[app_port] == int(env["METRICS_PORT"]) == 9464
            assert env["METRICS_HOST"] == "0.0.0.0"
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == "9464"
        if overlay == "envoy" and "postgres" not in deployment["metadata"]["name"]:
            assert ports.get("envoy-metrics") == 15090, deployment["metadata"]["name"]
    dashboard = built.config_map("shop-mesh-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["shop-mesh.json"])["uid"] == "shop-mesh"
    assert built.of_kind("PrometheusRule")[0]["metadata"]["name"] == "shop-mesh"

"""The database Secrets the overlays expect, and the Pod Security level of the namespace."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from shop_mesh.mesh.topology import Topology
from tests.k8s.manifests import K8S, OVERLAYS, Obj, build, pod_spec, tool, validate_strict

SCRIPT = K8S / "components" / "postgres" / "create-secrets.sh"


def _dry_run() -> list[Obj]:
    env = {**os.environ, "DRY_RUN": "1", "KUBECTL": tool("kubectl"), "KUBECONFIG": "/nonexistent"}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_create_secrets_makes_what_the_manifests_mount(topo: Topology, tmp_path: Path) -> None:
    secrets = {s["metadata"]["name"]: s for s in _dry_run()}
    built = build("overlays/envoy")
    mounted = {
        v["secret"]["secretName"]: {i["key"] for i in v["secret"].get("items", [])}
        for w in built.workloads()
        for v in pod_spec(w)["volumes"]
        if "secret" in v and v["secret"]["secretName"].endswith("-db")
    }
    assert set(mounted) == set(secrets) == {f"{name}-db" for name in topo.services}
    for name in topo.services:
        secret = secrets[f"{name}-db"]
        assert secret["metadata"]["namespace"] == topo.namespace
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert mounted[f"{name}-db"] <= set(data)
        url = urlsplit(data["database-url"])
        assert url.scheme == "postgresql+psycopg2"
        assert url.username == name and url.password == data["password"] and len(data["password"]) >= 32
        service = built.get("Service", f"{name}-db")
        assert url.hostname == f"{name}-db.{topo.namespace}.svc.cluster.local"
        assert url.port == service["spec"]["ports"][0]["port"] and url.path == f"/{name}"
    validate_strict(list(secrets.values()), tmp_path / "secrets.yaml")


def test_every_run_draws_new_passwords() -> None:
    first = {s["metadata"]["name"]: s["data"]["password"] for s in _dry_run()}
    second = {s["metadata"]["name"]: s["data"]["password"] for s in _dry_run()}
    assert all(first[k] != second[k] for k in first)


@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_namespace_pod_security_level(target: str) -> None:
    (namespace,) = build(target).of_kind("Namespace")
    labels = namespace["metadata"]["labels"]
    if target.endswith("linkerd"):
        # linkerd-init needs NET_ADMIN; violations are still reported (docs/deploy.md: linkerd-cni)
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
        assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    else:
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

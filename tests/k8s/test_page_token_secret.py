"""PAGE_TOKEN_SECRET: every replica of a service signs page tokens with the same key, from a Secret that
k8s/base/create-secrets.sh creates per environment (never committed), and a Deployment without it fails.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml

from shop_mesh.mesh.topology import Topology
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    Obj,
    build,
    created_secrets,
    pod_spec,
    validate_strict,
)

SCRIPT = K8S / "base" / "create-secrets.sh"
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
VAR = "PAGE_TOKEN_SECRET"
KEY = "page-token-secret"


def page_secrets() -> list[Obj]:
    return created_secrets(SCRIPT)


def page_token_problems(deployment: Obj, service: str, secrets: set[str]) -> list[str]:
    """What is wrong with how the service's container gets PAGE_TOKEN_SECRET (empty list: nothing)."""
    (app,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == service]
    found = [v for v in app.get("env", []) if v["name"] == VAR]
    if len(found) != 1:
        return [f"{service}: {VAR} is not set (found {len(found)} entries): replicas would sign differently"]
    (var,) = found
    ref = var.get("valueFrom", {}).get("secretKeyRef")
    if ref is None:
        return [f"{service}: {VAR} must come from a Secret, not {var}"]
    problems = []
    if ref.get("optional", False):
        problems.append(f"{service}: {VAR} is optional: a missing Secret would start it on the dev key")
    if ref["name"] not in secrets:
        problems.append(f"{service}: Secret {ref['name']!r} is not made by k8s/base/create-secrets.sh")
    if ref.get("key") != KEY:
        problems.append(f"{service}: key {ref.get('key')!r}, the script writes {KEY!r}")
    return problems


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_reads_the_page_token_secret_from_a_secret(target: str, topo: Topology) -> None:
    built = build(target)
    secrets = {s["metadata"]["name"] for s in page_secrets()}
    for name in topo.services:
        assert page_token_problems(built.get("Deployment", name), name, secrets) == []
    assert not built.of_kind("Secret"), "no Secret may be committed: create-secrets.sh makes them"


def _from_secret(name: str, *, optional: bool = False) -> Obj:
    ref = {"name": name, "key": KEY, **({"optional": True} if optional else {})}
    return {"name": VAR, "valueFrom": {"secretKeyRef": ref}}


@pytest.mark.parametrize(
    "replacement",
    [
        pytest.param(None, id="left-out"),
        pytest.param({"name": VAR, "value": "s3cret"}, id="literal"),
        pytest.param(_from_secret("somebody-elses-secret"), id="unknown-secret"),
        pytest.param(_from_secret("{service}-page-tokens", optional=True), id="optional"),
    ],
)
def test_a_deployment_without_the_secret_fails_the_check(replacement: Obj | None, topo: Topology) -> None:
    """The check above can fail: the same Deployment, with the variable broken, is reported."""
    secrets = {s["metadata"]["name"] for s in page_secrets()}
    name = next(iter(topo.services))
    deployment = copy.deepcopy(build("overlays/envoy").get("Deployment", name))
    (app,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    env = [v for v in app["env"] if v["name"] != VAR]
    if replacement is not None:
        env.append(yaml.safe_load(yaml.safe_dump(replacement).replace("{service}", name)))
    app["env"] = env
    assert page_token_problems(deployment, name, secrets)


def test_create_secrets_makes_one_random_secret_per_service(topo: Topology, tmp_path: Path) -> None:
    secrets = page_secrets()
    by_name = {s["metadata"]["name"]: s for s in secrets}
    # exactly the Secrets the Deployments reference, in the topology's namespace
    referenced = {
        v["valueFrom"]["secretKeyRef"]["name"]
        for name in topo.services
        for c in pod_spec(build("overlays/envoy").get("Deployment", name))["containers"]
        for v in c.get("env", [])
        if v["name"] == VAR
    }
    assert set(by_name) == referenced and len(referenced) == len(topo.services)
    values = set()
    for secret in secrets:
        assert secret["metadata"]["namespace"] == topo.namespace
        value = base64.b64decode(secret["data"][KEY]).decode()
        assert len(value) >= 64 and value.strip() == value, "256 random bits, no trailing newline"
        values.add(value)
    assert len(values) == len(secrets), "each service gets its own key"
    # a second run draws new ones (nothing fixed in the script)
    again = {s["metadata"]["name"]: s["data"][KEY] for s in page_secrets()}
    assert all(again[n] != by_name[n]["data"][KEY] for n in by_name)
    validate_strict(secrets, tmp_path / "secrets.yaml")

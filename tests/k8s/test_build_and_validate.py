"""k8s/ builds with the real kubectl, validates strictly, and carries only Envoy configs Envoy accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shop_mesh.mesh.topology import load
from tests.k8s.manifests import (
    CRD_GROUPS,
    K8S,
    OVERLAYS,
    REPO,
    api_group,
    build,
    is_crd,
    tool,
    unhashed,
    validate_strict,
    validate_strict_proc,
)

TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]


def test_committed_manifests_match_a_fresh_render_of_the_topology() -> None:
    """Everything in a k8s/**/generated/ folder is rendered from shop_mesh/mesh/topology.yaml."""
    proc = subprocess.run(
        [sys.executable, "-m", "k8s.render", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"k8s/ drifted from the topology:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_builds(target: str) -> None:
    built = build(target)
    assert built.of_kind("Deployment"), f"{target} renders no Deployment"
    namespaces = {o["metadata"].get("namespace") for o in built.objects if o["kind"] != "Namespace"}
    assert namespaces == {"shop"}, f"{target}: every object belongs in the shop namespace, got {namespaces}"


@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_pass_strict_schema_validation(target: str, tmp_path: Path) -> None:
    built = build(target)
    core = [o for o in built.objects if not is_crd(o)]
    crds = [o for o in built.objects if is_crd(o)]
    unknown = {api_group(o) for o in core if "." in api_group(o) and not api_group(o).endswith(".k8s.io")}
    assert not unknown, f"API groups that are neither core nor known CRDs: {unknown}"
    # CRDs are skipped explicitly (kubernetes-validate has no schema for them); test_structure checks them
    assert {api_group(o) for o in crds} <= CRD_GROUPS
    validate_strict(core, tmp_path / "core.yaml")


def test_strict_validation_really_rejects_unknown_fields(tmp_path: Path) -> None:
    """Guard against a validator that silently accepts everything."""
    deployment = next(o for o in build("base").of_kind("Deployment"))
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    proc = validate_strict_proc([broken], tmp_path / "broken.yaml")
    assert proc.returncode != 0 and "livenessProbes" in proc.stdout


# (overlay, ConfigMap before its hash suffix) of every Envoy config the overlays are expected to carry
EXPECTED_ENVOY_CONFIGS = [
    ("base", "edge-envoy"),
    ("linkerd", "edge-envoy"),
    ("envoy", "edge-envoy"),
    *(("envoy", f"envoy-{name}") for name in load().services),
]


def test_no_envoy_config_escapes_validation() -> None:
    for target in TARGETS:
        carried = {
            unhashed(cm["metadata"]["name"])
            for cm in build(target).of_kind("ConfigMap")
            if "envoy.yaml" in (cm.get("data") or {})
        }
        expected = {cm for overlay, cm in EXPECTED_ENVOY_CONFIGS if target.endswith(overlay)}
        assert carried == expected, target


@pytest.mark.parametrize(("overlay", "config_map"), EXPECTED_ENVOY_CONFIGS)
def test_envoy_config_passes_envoy_validate(
    overlay: str, config_map: str, tmp_path: Path, mesh_certs: Path
) -> None:
    """The ConfigMap is materialized as the pod sees it: every key in the config dir, the certs beside."""
    topo = load()
    target = "base" if overlay == "base" else f"overlays/{overlay}"
    data: dict[str, str] = build(target).config_map(config_map)["data"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, text in data.items():
        text = text.replace(topo.k8s.cert_dir, str(mesh_certs)).replace(topo.k8s.config_dir, str(config_dir))
        (config_dir / key).write_text(text)
    proc = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config_dir / "envoy.yaml"), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{target}/{config_map}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "OK" in proc.stdout + proc.stderr


def test_overlays_are_the_only_entry_points() -> None:
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../../base"]
        assert kustomization["components"] == [
            "../../components/postgres",
            f"../../components/{overlay}",
            "../../components/monitoring",
        ]

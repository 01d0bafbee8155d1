"""`envoy --mode validate` for rendered bootstraps, local or Kubernetes.

Envoy insists that SDS/EDS paths exist at load time. Kubernetes configs point at /etc/envoy/...,
which does not exist off-cluster, so they are validated in a scratch root that mirrors those paths.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shop_mesh.mesh.render import SDS_FILES
from shop_mesh.mesh.runner import envoy_binary
from shop_mesh.mesh.topology import Topology


@dataclass(frozen=True)
class Result:
    path: Path
    ok: bool
    output: str


def validate_file(path: Path, topo: Topology | None = None) -> Result:
    text = path.read_text()
    with tempfile.TemporaryDirectory(prefix="mesh-validate-") as tmp:
        config = path
        if topo is not None and (topo.k8s.config_dir in text or topo.k8s.cert_dir in text):
            root = Path(tmp)
            for d in (topo.k8s.config_dir, topo.k8s.cert_dir):
                (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for name in SDS_FILES.values():
                sibling = path.with_name(name)
                target = root / topo.k8s.config_dir.lstrip("/") / name
                target.write_text(sibling.read_text() if sibling.exists() else "resources: []\n")
            for name in ("tls.crt", "tls.key", "ca.crt"):
                (root / topo.k8s.cert_dir.lstrip("/") / name).touch()
            for d in (topo.k8s.config_dir, topo.k8s.cert_dir):
                text = text.replace(d, str(root / d.lstrip("/")))
            config = root / path.name
            config.write_text(text)
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config), "-l", "error", "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    return Result(path, proc.returncode == 0, (proc.stdout + proc.stderr).strip())


def bootstraps(directory: Path) -> list[Path]:
    """Every Envoy bootstrap in a render output (SDS/EDS resource files are not bootstraps)."""
    return sorted(
        p for p in directory.rglob("*.yaml") if "static_resources" in p.read_text() and p.parent.name != "sds"
    )

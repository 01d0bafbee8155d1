"""Running the local mesh (`python -m shop_mesh.mesh run`) for the mesh scenarios, and finding its
processes."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shop_mesh.bench.env import REPO, Proc, Stack, Unavailable, check_serving, free_port, wait_serving

# The edge routes grpc.health.v1 to the service this header names (shop_mesh/mesh/topology.yaml
# edge.service_header).
SERVICE_HEADER = "x-shop-service"
SERVICES = {
    "user": "shop.user.v1.UserService",
    "order": "shop.order.v1.OrderService",
    "payment": "shop.payment.v1.PaymentService",
}


@dataclass
class MeshRun:
    proc: Proc
    edge: str  # 127.0.0.1:port of the edge gateway
    direct: dict[str, str]  # service -> 127.0.0.1:port of its app (plaintext, no proxy)
    pids: dict[str, int]  # label -> pid: user, order, payment, sidecar-user, ..., edge
    user_database_url: str | None
    startup_s: float
    run_dir: Path | None = None  # the runner's directory (pki/ holds the run's certificates)
    notes: list[str] = field(default_factory=list)
    # An admin end-user token for calls through the edge (which verifies a JWT on every shop RPC).
    token: str = ""


def mesh_runnable() -> str | None:
    if not (REPO / "shop_mesh" / "mesh" / "__main__.py").exists():
        return (
            "the mesh runner (shop_mesh/mesh/__main__.py, `python -m shop_mesh.mesh run`) does not exist yet"
        )
    if not (Path(sys.executable).parent / "envoy").exists():
        return "envoy is not installed in the venv"
    return None


def start_mesh(
    stack: Stack, run_dir: Path, env: dict[str, str] | None = None, timeout: float = 90
) -> MeshRun:
    """Start the whole local mesh (`python -m shop_mesh.mesh run`) in its own run directory, on a free edge
    port, and wait until every service is SERVING through the edge.

    `startup_s` runs from just before the runner is spawned to the moment the last health check
    through the edge said SERVING (polled here, every 50 ms, independently of the runner's own
    readiness message).
    """
    if why := mesh_runnable():
        raise Unavailable(why)
    header = _service_header()
    edge_port = free_port()
    argv = [
        sys.executable,
        "-m",
        "shop_mesh.mesh",
        "--run-dir",
        str(run_dir),
        "run",
        "--edge-port",
        str(edge_port),
        "--edge-admin-port",
        "0",
        "--quiet",
        # The topology's edge rate limit (2,000/s) would cap every edge figure; measure past it.
        "--edge-rate-limit",
        "1000000",
    ]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    t0 = time.monotonic()
    # The runner drains the apps on SIGTERM (edge, apps, then sidecars): give it time.
    proc = stack.start("mesh", argv, grace=45)
    edge = f"127.0.0.1:{edge_port}"
    deadline = t0 + timeout
    pending = dict(SERVICES)
    while pending and time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(
                f"`python -m shop_mesh.mesh run` exited with {proc.popen.returncode}: {_last(proc)}"
            )
        for name, full in list(pending.items()):
            if check_serving(edge, full, timeout=0.5, metadata=((header, name),)):
                pending.pop(name)
        if pending:
            time.sleep(0.05)
    startup = time.monotonic() - t0
    if pending:
        stack.stop(proc)
        raise Unavailable(f"mesh not SERVING through the edge within {timeout:.0f} s: {sorted(pending)}")
    state = _read_state(run_dir / "state.json", proc, deadline)
    direct: dict[str, str] = {}
    pids: dict[str, int] = {}
    for inst in state.get("instances", []):
        service = str(inst["service"])
        if int(inst.get("index", 0)) != 0 or service not in SERVICES:
            continue
        direct[service] = f"127.0.0.1:{int(inst['app_port'])}"
        pids[service] = int(inst["app_pid"])
        pids[f"sidecar-{service}"] = int(inst["sidecar_pid"])
    if state.get("edge_pid"):
        pids["edge"] = int(state["edge_pid"])
    pids["mesh-runner"] = proc.pid
    missing = set(SERVICES) - set(direct)
    if missing:
        stack.stop(proc)
        raise Unavailable(f"mesh state.json lists no instance of {sorted(missing)}")
    user_db = run_dir / "data" / "user.db"
    from shop_mesh.mesh import tokens
    from shop_mesh.mesh.topology import load

    topo = load()
    token = tokens.mint(run_dir / "pki" / "jwt", topo.auth.local, "bench", [topo.auth.admin_role], 24 * 3600)
    return MeshRun(
        token=token,
        proc=proc,
        edge=edge,
        direct=direct,
        pids=pids,
        user_database_url=f"sqlite:///{user_db.resolve()}" if user_db.exists() else None,
        startup_s=startup,
        run_dir=run_dir,
    )


def _service_header() -> str:
    try:
        from shop_mesh.mesh.topology import load

        return str(getattr(load(), "edge_service_header", SERVICE_HEADER))
    except Exception:
        return SERVICE_HEADER


def _read_state(path: Path, proc: Proc, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline + 10:
        try:
            state: dict[str, Any] = json.loads(path.read_text())
            if state.get("ready"):
                return state
        except (OSError, ValueError):
            pass
        if not proc.alive():
            break
        time.sleep(0.05)
    raise Unavailable(f"mesh runner wrote no ready state to {path}")


def _last(proc: Proc) -> str:
    lines = [line for line in proc.log_tail().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def classify(pid: int) -> dict[str, int]:
    """Label the runner's descendants: apps by their module, Envoys by their config file name."""
    labels: dict[str, int] = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return labels
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        text = " ".join(cmd)
        for name in SERVICES:
            if f"shop_mesh.services.{name}" in text:
                labels[name] = child.pid
        if cmd and cmd[0].endswith("envoy"):
            label = (
                "edge"
                if "edge" in text
                else next((f"sidecar-{n}" for n in SERVICES if n in text), f"envoy-{child.pid}")
            )
            labels[label] = child.pid
    return labels


def wait_edge(edge: str, timeout: float, proc: Proc | None = None) -> float:
    t0 = time.monotonic()
    wait_serving(edge, list(SERVICES.values()), timeout, proc)
    return time.monotonic() - t0

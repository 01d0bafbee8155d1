"""The README's "run it": `make run` on a clean copy of the repository brings the whole mesh up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shop_mesh.mesh.local import RunDir, read_state
from tests.mesh.conftest import alive
from tests.support import REPO, free_port

pytestmark = pytest.mark.slow


def _clean_copy(dest: Path) -> None:
    """What a fresh clone has: the files git knows about (tracked or not ignored), no .run/, no caches.
    The virtualenv is shared (a symlink) instead of being reinstalled."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            dst = dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)  # keeps mtimes: make sees the shared venv as up to date
    (dest / ".venv").symlink_to(REPO / ".venv")


def test_make_run_on_a_clean_copy_serves_through_the_edge(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    _clean_copy(clone)
    assert not (clone / ".run").exists()
    edge = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "make-run.log"
    env = {
        **os.environ,
        "MESH_EDGE_PORT": edge.rsplit(":", 1)[1],
        "MESH_EDGE_ADMIN_PORT": "0",
    }
    env.pop("MESH_RUN_DIR", None)
    with log_path.open("wb") as log:
        # -o: never rebuild the (shared) virtualenv from this copy.
        proc = subprocess.Popen(
            ["make", "-o", ".venv/.installed", "run"],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = RunDir(clone / ".run")
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 150
        while "shop-mesh is up" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        text = log_path.read_text(errors="replace")
        assert f"Edge (plaintext h2c): {edge}" in text
        assert "grpcurl -plaintext" in text
        # The walk-through mints a customer token and presents it on every shop call.
        assert "T=$(python -m shop_mesh.mesh token --user USER_ID)" in text
        assert 'grpcurl -plaintext -H "authorization: Bearer $T"' in text
        with grpc.insecure_channel(edge) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name, service in [
                ("user", "shop.user.v1.UserService"),
                ("order", "shop.order.v1.OrderService"),
                ("payment", "shop.payment.v1.PaymentService"),
            ]:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    metadata=[("x-shop-service", name)],
                    timeout=5,
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = subprocess.run(
            [str(REPO / ".venv/bin/grpcurl"), "-plaintext", edge, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        assert {
            "shop.user.v1.UserService",
            "shop.order.v1.OrderService",
            "shop.payment.v1.PaymentService",
        } <= set(listed)
        # The dev PKI was made on first run, inside the ignored .run/ (never committed).
        assert (run.pki / "ca" / "ca.key").is_file()
        ignored = subprocess.run(["git", "check-ignore", "-q", ".run/pki/ca/ca.key"], cwd=REPO, check=False)
        assert ignored.returncode == 0
        state = read_state(run)
        assert state is not None
        pids = [state["edge_pid"]] + [p for i in state["instances"] for p in (i["app_pid"], i["sidecar_pid"])]
        assert all(alive(p) for p in pids)
    finally:
        # Ctrl-C, as a terminal sends it: to the whole foreground group (make and the runner).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
    lines = log_path.read_text(errors="replace").splitlines()
    assert [p for p in pids if alive(p)] == []

    def first(pred: str, prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.strip().startswith(prefix) and pred in line)

    # Ctrl-C order: the edge, then the apps drain and exit cleanly, then the sidecars.
    stopping = first("stopping: edge, then apps (drain), then sidecars", "mesh |")
    edge_down = first("caught ENVOY_SIGTERM", "edge |")
    for app in ("user-0", "order-0", "payment-0"):
        drained = first('"event": "shutting_down"', f"{app} |")
        stopped = first('"event": "stopped"', f"{app} |")
        sidecar_down = first("caught ENVOY_SIGTERM", f"{app}.envoy |")
        assert stopping < edge_down < drained < stopped < sidecar_down, (app, lines[stopping:])
    assert lines[-1].strip() == "mesh | stopped" or "mesh | stopped" in "\n".join(lines[-5:])

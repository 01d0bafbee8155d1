"""The container command and environment that Kubernetes uses start a real service that reports SERVING.

The command is read from the built Deployment (not restated here), its ConfigMap-sourced environment is
resolved as the kubelet would, and only what a laptop must change is overridden: HOST (loopback), PORT (a
free port), DATA_DIR (a temp dir, so the default SQLite database is used). `python` in the command is the
image's venv interpreter (PATH=/opt/venv/bin:... in the Dockerfile); here it is this venv's.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shop_mesh.mesh.topology import Topology, load
from tests.k8s.manifests import build, container_env, pod_spec

SERVICES = list(load().services)
STARTUP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        status: int = response.status
        return status


@pytest.mark.parametrize("name", SERVICES)
def test_manifest_command_starts_a_serving_service(name: str, topo: Topology, tmp_path: Path) -> None:
    if importlib.util.find_spec(f"shop_mesh.services.{name}.__main__") is None:
        pytest.skip(f"shop_mesh/services/{name}/__main__.py does not exist yet")
    built = build("base")
    (app,) = [c for c in pod_spec(built.get("Deployment", name))["containers"] if c["name"] == name]
    command = [*app.get("command", []), *app.get("args", [])]
    assert command[0] == "python", f"the image runs `python` from its venv, got {command}"
    env = container_env(built, app)
    port = _free_port()
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp_path)})
    # kubelet gives the container no PATH of ours: start from a clean environment plus what it needs
    run_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8", **env}
    log = (tmp_path / "service.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, *command[1:]],
        cwd=tmp_path,  # not the repo: the code must come from the installed package, as in the image
        env=run_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{_tail(tmp_path)}"
            try:
                statuses = {s: _check(port, s) for s in ("", topo.services[name].grpc_service)}
                if set(statuses.values()) == {health_pb2.HealthCheckResponse.SERVING}:
                    break
                last = statuses
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.2)
        else:
            pytest.fail(f"{name} not SERVING within {STARTUP_TIMEOUT_S}s (last: {last}):\n{_tail(tmp_path)}")
        # SIGTERM as the kubelet sends it: drain, then exit 0 within the manifest's grace period
        proc.send_signal(signal.SIGTERM)
        grace = int(env["GRACE_PERIOD_SECONDS"])
        assert proc.wait(timeout=grace + 5) == 0, _tail(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "service.log").read_text()[-3000:]


@pytest.mark.parametrize("name", SERVICES)
def test_every_overlay_runs_the_same_command(name: str) -> None:
    """So starting the base Deployment's command above stands for every overlay's."""
    commands = set()
    for target in ("base", "overlays/envoy", "overlays/linkerd"):
        (app,) = [
            c for c in pod_spec(build(target).get("Deployment", name))["containers"] if c["name"] == name
        ]
        commands.add((*app.get("command", []), *app.get("args", [])))
    assert commands == {("python", "-m", f"shop_mesh.services.{name}")}

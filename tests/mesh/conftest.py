"""Helpers for the mesh tier: a real `python -m mesh run` (apps, Envoy sidecars, edge) per fixture."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.local import RunDir, read_state
from tests.support import REPO, free_port

READY_TIMEOUT_S = 150.0


@pytest.hookimpl(trylast=True)
def admin_get(address: str, path: str, timeout: float = 3.0) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())


def stats(admin: str, prefix: str = "") -> dict[str, int]:
    """Envoy counters and gauges (histograms skipped) as {name: value}."""
    out: dict[str, int] = {}
    for line in admin_get(admin, "/stats").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def stat(admin: str, name: str) -> int:
    return stats(admin, name).get(name, 0)


def host_flags(admin: str, cluster: str, address: str) -> str:
    """Envoy's health flags for one upstream host ("healthy", "/failed_active_hc", ...); "" if absent."""
    prefix = f"{cluster}::{address}::health_flags::"
    for line in admin_get(admin, "/clusters").splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return ""


def wait_in_rotation(admin: str, cluster: str, address: str, timeout: float = 30.0) -> None:
    """Until the Envoy at `admin` load-balances to `address` (it passed its health checks)."""
    deadline = time.monotonic() + timeout
    flags = ""
    while time.monotonic() < deadline:
        flags = host_flags(admin, cluster, address)
        if flags == "healthy":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not in rotation of {cluster} at {admin}: {flags!r}")


class MeshProcess:
    """`python -m mesh run` in its own process group; stopped with SIGINT like a Ctrl-C."""

    def __init__(
        self,
        run_dir: Path,
        *,
        replicas: dict[str, int] | None = None,
        env: Sequence[str] = (),
        topology: Path | None = None,
        cwd: Path = REPO,
        extra_env: dict[str, str] | None = None,
        run_args: Sequence[str] = (),
    ):
        self.run = RunDir(run_dir)
        self.edge_port = free_port()
        self.edge = f"127.0.0.1:{self.edge_port}"
        self.log_path = run_dir.parent / f"{run_dir.name}-runner.log"
        argv = [sys.executable, "-m", "mesh", "--run-dir", str(run_dir)]
        if topology is not None:
            argv += ["--topology", str(topology)]
        argv += ["run", "--quiet", "--edge-port", str(self.edge_port), "--edge-admin-port", "0"]
        for name, count in (replicas or {}).items():
            argv += ["--replicas", f"{name}={count}"]
        for item in env:
            argv += ["--env", item]
        argv += list(run_args)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(extra_env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh runner exited ({self.proc.returncode}):\n{self.logs()[-4000:]}")
            state = read_state(self.run)
            if state and state.get("ready"):
                return state
            time.sleep(0.3)
        raise TimeoutError(f"mesh not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def state(self) -> dict[str, Any]:
        state = read_state(self.run)
        assert state is not None
        return state

    def instance(self, name: str) -> dict[str, Any]:
        return next(i for i in self.state()["instances"] if i["name"] == name)

    def wait_all_in_rotation(self) -> None:
        """Every live instance is in the edge's rotation and in its callers' sidecars' rotation."""
        state = self.state()
        live = [i for i in state["instances"] if i["app_alive"] and i["ready"]]
        for inst in live:
            address = f"127.0.0.1:{inst['inbound_port']}"
            wait_in_rotation(str(state["edge_admin"]), inst["service"], address)
            for caller in live:
                if inst["service"] in caller["outbound_ports"]:
                    wait_in_rotation(f"127.0.0.1:{caller['admin_port']}", inst["service"], address)

    @property
    def edge_admin(self) -> str:
        return str(self.state()["edge_admin"])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh", "--run-dir", str(self.run.root), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def control(self, *args: str) -> dict[str, Any]:
        proc = self.cli(*args)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def all_pids(self) -> list[int]:
        state = read_state(self.run) or {}
        pids = [state.get("edge_pid")]
        for inst in state.get("instances", []):
            pids += [inst.get("app_pid"), inst.get("sidecar_pid")]
        return [p for p in pids if p]

    def stop(self, timeout: float = 60) -> int | None:
        """Ctrl-C, wait for the orderly stop; then make sure nothing it started is left."""
        pids = self.all_pids()
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_mesh(run_dir: Path, **kwargs: Any) -> Iterator[MeshProcess]:
    mesh = MeshProcess(run_dir, **kwargs)
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def edge_channel(mesh: MeshProcess) -> grpc.Channel:
    return grpc.insecure_channel(mesh.edge)

"""The pieces of the runner's supervision without a mesh: restart backoff, how an exit is described,
the status table, the pid check behind `mesh status`, and the warm standby (`shop_mesh.mesh.warm`)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shop_mesh.mesh.runner import Backoff, _check_pids, exit_description, format_status
from tests.support import REPO, free_port, wait_serving


def test_backoff_doubles_to_its_cap_and_starts_over_after_stable_running() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, stable_after=10.0)
    # A crash loop: every process dies at once.
    assert [backoff.delay(ran_for=0.5) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    # A process that ran long enough before crashing is restarted at once again.
    assert backoff.delay(ran_for=30.0) == 0.2
    assert backoff.delay(ran_for=1.0) == 0.4


def test_an_exit_is_described_by_code_or_signal() -> None:
    assert exit_description(0) == "code 0"
    assert exit_description(3) == "code 3"
    assert exit_description(-signal.SIGKILL) == "SIGKILL"
    assert exit_description(-signal.SIGSEGV) == "SIGSEGV"


def _process(
    pid: int | None, state: str = "running", restarts: int = 0, last_exit: str = ""
) -> dict[str, Any]:
    return {
        "pid": pid,
        "state": state,
        "restarts": restarts,
        "last_exit": last_exit,
        "since": time.time() - 75,
    }


def _state(app_pid: int | None) -> dict[str, Any]:
    return {
        "edge": "127.0.0.1:8080",
        "edge_admin": "127.0.0.1:9900",
        "runner_pid": os.getpid(),
        "ready": True,
        "crashes": 2,
        "edge_alive": True,
        "edge_process": _process(os.getpid(), restarts=1, last_exit="SIGKILL"),
        "edge_health": "ready",
        "through_edge": {"user": "SERVING"},
        "instances": [
            {
                "name": "user-0",
                "service": "user",
                "app_port": 50051,
                "inbound_port": 40001,
                "app_alive": True,
                "sidecar_alive": True,
                "app_process": _process(app_pid, restarts=1, last_exit="code 1"),
                "sidecar_process": _process(os.getpid()),
                "app_health": "SERVING",
                "sidecar_ready": True,
                "endpoint_health": "HEALTHY",
                "draining": False,
                "healing": False,
            }
        ],
    }


def test_status_table_has_a_row_per_process_with_its_supervision() -> None:
    table = format_status(_state(os.getpid())).splitlines()
    assert table[0].endswith("crashes=2")
    assert table[3].split()[:8] == ["process", "port", "pid", "state", "since", "restarts", "last", "exit"]
    rows = {line.split()[0]: line.split() for line in table[4:]}
    assert rows["edge"][:7] == ["edge", "8080", str(os.getpid()), "running", "1m15s", "1", "SIGKILL"]
    assert rows["user-0"][3:9] == ["running", "1m15s", "1", "code", "1", "SERVING"]
    assert rows["user-0.envoy"][1] == "40001"
    assert rows["user-0.envoy"][5:] == ["0", "-", "ready", "HEALTHY"]


def test_a_process_the_file_calls_running_but_is_dead_is_shown_dead() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = _state(dead.pid)
    _check_pids(state)
    inst = state["instances"][0]
    assert inst["app_alive"] is False and inst["app_process"]["state"] == "dead"
    assert inst["sidecar_alive"] is True and inst["sidecar_process"]["state"] == "running"  # this process
    assert state["edge_process"]["state"] == "running"


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _standby(tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], int]:
    """The standby and the read end of the pipe on which it says it is warm."""
    ready_r, ready_w = os.pipe()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATA_DIR": str(tmp_path),
        "MESH_WARM_READY_FD": str(ready_w),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "shop_mesh.mesh.warm", "shop_mesh.services.user"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(ready_w,),
    )
    os.close(ready_w)
    return proc, ready_r


def _wait_warm(ready_r: int, timeout: float = 60.0) -> bytes:
    try:
        readable, _, _ = select.select([ready_r], [], [], timeout)
        return os.read(ready_r, 1) if readable else b"(timeout)"
    finally:
        os.close(ready_r)


@pytest.mark.slow
def test_warm_standby_binds_nothing_until_told_then_runs_the_app(tmp_path: Path) -> None:
    port = free_port()
    standby, ready_r = _standby(tmp_path, port)
    try:
        assert standby.stdin is not None
        assert _wait_warm(ready_r) == b"1"  # imports done ...
        assert standby.poll() is None and not _port_open(port)  # ... waiting, nothing bound
        standby.stdin.write(b"go\n")
        standby.stdin.close()
        asyncio.run(wait_serving(f"127.0.0.1:{port}", "shop.user.v1.UserService", timeout=60))
        standby.send_signal(signal.SIGTERM)  # the app's own orderly stop
        assert standby.wait(timeout=30) == 0
    finally:
        standby.kill()
        standby.wait(timeout=10)


@pytest.mark.slow
def test_an_unused_standby_exits_on_eof(tmp_path: Path) -> None:
    port = free_port()
    standby, ready_r = _standby(tmp_path, port)
    try:
        assert standby.stdin is not None
        assert _wait_warm(ready_r) == b"1"
        standby.stdin.close()
        assert standby.wait(timeout=60) == 0
        assert not _port_open(port)
    finally:
        standby.kill()
        standby.wait(timeout=10)

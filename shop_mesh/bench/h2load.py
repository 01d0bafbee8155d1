"""Drive a fixed unary gRPC request with h2load (nghttp2's C HTTP/2 load generator).

It is an independent client written in C: if it gets a much higher RPS from the same server than the
Python load generator, the Python client is (part of) the bottleneck. It speaks plain HTTP/2, so a
gRPC call is a POST of the length-prefixed message with `content-type: application/grpc`; it sees
the HTTP status, not the grpc-status trailer, so its error count only covers transport failures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class H2loadResult:
    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    mean_ms: float | None
    max_ms: float | None
    clients: int
    streams_per_client: int
    command: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value if unit == "ms" else value * 1000


def run_h2load(
    target: str,
    method: str,
    message: bytes,
    *,
    duration: float,
    warmup: float,
    clients: int = 4,
    streams: int = 32,
    threads: int = 1,
) -> H2loadResult:
    """Closed-loop maximum throughput: `clients` connections with `streams` concurrent calls each."""
    if not target.startswith("127.0.0.1:"):
        raise ValueError("the benchmark only sends traffic to 127.0.0.1")
    exe = shutil.which("h2load")
    if exe is None:
        raise FileNotFoundError("h2load is not installed (apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(grpc_frame(message))
        cmd = [
            exe,
            "-D",
            str(max(1, round(duration))),
            f"--warm-up-time={max(0, round(warmup))}",
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            str(threads),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://{target}{method}",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + warmup + 60, check=False
        )
    out = proc.stdout
    rps_m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    req_m = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    if not rps_m or not req_m:
        raise RuntimeError(f"h2load failed (exit {proc.returncode}): {(proc.stderr or out)[-400:]}")
    t_m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return H2loadResult(
        rps=float(rps_m.group(1)),
        done=int(req_m.group(1)),
        succeeded=int(req_m.group(2)),
        failed=int(req_m.group(3)),
        errored=int(req_m.group(4)),
        mean_ms=_to_ms(t_m.group(3)) if t_m else None,
        max_ms=_to_ms(t_m.group(2)) if t_m else None,
        clients=clients,
        streams_per_client=streams,
        command=" ".join(cmd[1:-1]) + f" http://{target}{method}",
    )

"""The local mesh's on-disk layout under `.run/` and the plans the renderer turns into Envoy configs.

.run/
  pki/ca/                    the dev CA (ca.crt, ca.key)
  pki/<identity>/            tls.crt, tls.key, ca.crt -> ..data/ (swapped atomically on rotation)
  sds/<identity>/            sds-identity.yaml, sds-ca.yaml (file-based SDS, pointing at pki/<identity>)
  eds/<service>.yaml         file-based EDS: the inbound addresses of the service's sidecars
  envoy/<instance>.yaml      rendered bootstraps (sidecars and edge.yaml)
  data/                      DATA_DIR of every app (replicas of a service share one SQLite file)
  logs/<process>.log         one log per process
  state.json                 what runs where (written by the runner, read by `mesh status`)
  control.sock               the runner's control socket (`mesh scale`)
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shop_mesh.mesh import pki, tokens
from shop_mesh.mesh.render import (
    Address,
    CertSource,
    Discovery,
    EdgePlan,
    Pems,
    SidecarPlan,
    eds_assignment,
    sds_resources,
    write_yaml,
)
from shop_mesh.mesh.topology import EDGE, Topology

_EPHEMERAL_DEFAULT = (32768, 60999)
_LOWEST_PORT = 10_000
# Ports this process handed out or was told are taken: never handed out (again) here.
_taken: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def _port_pool() -> range:
    """Where `free_port` picks: below the kernel's ephemeral range (above it if too little is left
    below), split between pytest-xdist workers so that two workers never pick the same port."""
    low, high = _ephemeral_range()
    pool = range(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 4_000 else range(high + 1, 65_536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3"; inherited by the mesh runner
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        share = len(pool) // workers
        start = pool.start + (int(worker[2:]) % workers) * share
        pool = range(start, start + share)
    return pool


def reserve_port(port: int) -> None:
    """A port chosen elsewhere (e.g. passed on the command line) that `free_port` must not pick."""
    _taken.add(port)


# grpc core reads GRPC_EXPERIMENTS when `grpc` is imported, so it goes into the apps' environment (the
# runner, the bench's services, the Dockerfile), not into code. "-event_engine_listener": accepted
# connections are served by the iomgr listener on gRPC's poller thread instead of EventEngine's thread
# pool, with no thread hand-off per read and write (~7-12 % less app CPU per GetUser,
# docs/performance.md "gRPC per-call gap, session 7"). Server side only; clients see the same.
GRPC_SERVER_EXPERIMENTS = "-event_engine_listener"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server started later.

    Not `bind(0)`: that hands out a port of the ephemeral range, where any outgoing connection of
    any process, or another `bind(0)`, may take it before the server binds (a test's Envoy edge,
    whose port was picked seconds before it started, failed with "Address already in use"). Ports
    outside that range are taken only by servers that chose them, i.e. by this function: per
    process it never returns a port twice, and xdist workers pick from disjoint shares."""
    pool = _port_pool()
    for _ in range(1_000):
        port = random.randrange(pool.start, pool.stop)
        if port in _taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port in {pool.start}-{pool.stop - 1}")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def sds(self) -> Path:
        return self.root / "sds"

    @property
    def jwt(self) -> Path:
        """The dev signing key of end-user tokens and its JWKS (shop_mesh/mesh/tokens.py)."""
        return self.pki / "jwt"

    @property
    def eds(self) -> Path:
        return self.root / "eds"

    @property
    def envoy(self) -> Path:
        return self.root / "envoy"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    def make(self) -> None:
        for d in (self.pki, self.sds, self.eds, self.envoy, self.data, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def certs(self, identity: str) -> CertSource:
        return CertSource(sds_dir=str(self.sds / identity), cert_dir=str(self.pki / identity), inline=True)

    def discovery(self) -> Discovery:
        return Discovery(eds_dir=str(self.eds))


@dataclass
class Instance:
    """One replica of a service: its app and its sidecar, with their loopback ports."""

    service: str
    index: int
    app_port: int
    inbound_port: int
    admin_port: int
    outbound_ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0  # the app's Prometheus endpoint (METRICS_PORT)
    stats_port: int = 0  # the sidecar's /stats/prometheus (shop_mesh/mesh/render_metrics.py)

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def inbound(self) -> Address:
        return Address("127.0.0.1", self.inbound_port)

    @classmethod
    def allocate(cls, topo: Topology, service: str, index: int) -> Instance:
        return cls(
            service=service,
            index=index,
            app_port=free_port(),
            inbound_port=free_port(),
            admin_port=free_port(),
            outbound_ports={up: free_port() for up in topo.services[service].upstreams},
            metrics_port=free_port(),
            stats_port=free_port(),
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}


def sidecar_plan(run: RunDir, inst: Instance) -> SidecarPlan:
    return SidecarPlan(
        service=inst.service,
        node_id=inst.name,
        app=Address("127.0.0.1", inst.app_port),
        inbound=inst.inbound,
        outbound={up: Address("127.0.0.1", port) for up, port in inst.outbound_ports.items()},
        admin=Address("127.0.0.1", inst.admin_port),
        certs=run.certs(inst.service),
        discovery=run.discovery(),
        stats=Address("127.0.0.1", inst.stats_port) if inst.stats_port else None,
    )


def edge_plan(run: RunDir, port: int, admin_port: int, tls: bool = False, stats_port: int = 0) -> EdgePlan:
    return EdgePlan(
        listen=Address("127.0.0.1", port),
        admin=Address("127.0.0.1", admin_port),
        certs=run.certs(EDGE),
        discovery=run.discovery(),
        tls=tls,
        jwks_file=str(run.jwt / tokens.JWKS_FILE),
        stats=Address("127.0.0.1", stats_port) if stats_port else None,
    )


def prepare_pki(topo: Topology, run: RunDir, *, force: bool = False) -> list[str]:
    """CA + a leaf per identity (only what is missing or stale unless forced), and their SDS files."""
    renewed = pki.ensure_identities(
        run.pki, {identity: topo.spiffe_id(identity) for identity in topo.identities()}, force=force
    )
    tokens.ensure_signing_key(run.jwt)  # the edge verifies end-user tokens with its JWKS
    for identity in topo.identities():
        certs = run.certs(identity)
        cert_dir = Path(certs.cert_dir)
        pems = Pems(
            cert=(cert_dir / "tls.crt").read_bytes(),
            key=(cert_dir / "tls.key").read_bytes(),
            ca=(cert_dir / "ca.crt").read_bytes(),
        )
        for name, resource in sds_resources(certs, pems).items():
            path = run.sds / identity / name
            # Rewritten (atomically) only when the PEMs changed: every rewrite is an SDS push.
            if not path.exists() or identity in renewed:
                write_yaml(path, resource, private=True)
    return renewed


def write_eds(run: RunDir, service: str, endpoints: list[tuple[str, Address, bool]]) -> None:
    write_yaml(run.eds / f"{service}.yaml", eds_assignment(service, endpoints))


def read_state(run: RunDir) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(run.state.read_text())
    except (OSError, ValueError):
        return None
    return state

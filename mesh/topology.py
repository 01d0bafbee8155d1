"""The mesh topology: one YAML file (mesh/topology.yaml) that every rendered config derives from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TOPOLOGY_PATH = Path(__file__).with_name("topology.yaml")
EDGE = "edge"
RetryClass = Literal["none", "read", "idempotent"]


@dataclass(frozen=True)
class RoutePolicy:
    """What the mesh does for one class of route: timeouts and retries."""

    timeout_s: float | None
    per_try_timeout_s: float | None = None
    num_retries: int = 0
    retry_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One RPC as the mesh sees it: its full gRPC path, who may call it, how it is retried."""

    service: str  # fully qualified gRPC service, e.g. shop.user.v1.UserService
    name: str  # e.g. GetUser
    callers: tuple[str, ...]
    retry: RetryClass = "none"
    streaming: bool = False

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True)
class Service:
    name: str  # mesh identity and ServiceAccount name: user, order, payment
    grpc_service: str
    app_port: int
    replicas: int
    upstreams: tuple[str, ...]
    methods: tuple[Method, ...]

    def callers(self) -> set[str]:
        """Every identity that may call anything of this service (its own methods only)."""
        return {c for m in self.methods for c in m.callers}


@dataclass(frozen=True)
class Topology:
    trust_domain: str
    namespace: str
    policies: dict[str, RoutePolicy]
    stream_idle_timeout_s: float
    edge_port: int
    edge_admin_port: int
    edge_rate_limit: dict[str, Any]
    services: dict[str, Service]
    common_methods: tuple[Method, ...] = field(default=())

    def spiffe_id(self, identity: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{identity}"

    def identities(self) -> list[str]:
        return [*self.services, EDGE]

    def methods_of(self, service: str) -> tuple[Method, ...]:
        """The service's own RPCs followed by the ones every app serves (health, reflection)."""
        return self.services[service].methods + self.common_methods

    def edges(self) -> set[tuple[str, str]]:
        """Caller -> callee pairs that need network reachability (own RPCs, not health checks)."""
        return {(caller, svc.name) for svc in self.services.values() for caller in svc.callers()}


def _duration(value: str | float | int | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    raise ValueError(f"bad duration {value!r}: use e.g. '2s' or '250ms'")


def load(path: Path = TOPOLOGY_PATH) -> Topology:
    raw = yaml.safe_load(path.read_text())
    policies = {
        name: RoutePolicy(
            timeout_s=_duration(spec.get("timeout")),
            per_try_timeout_s=_duration(spec.get("per_try_timeout")),
            num_retries=int(spec.get("num_retries", 0)),
            retry_on=tuple(spec.get("retry_on", ())),
        )
        for name, spec in raw["policies"].items()
        if name != "streaming"
    }
    services: dict[str, Service] = {}
    for name, spec in raw["services"].items():
        methods = tuple(
            Method(
                service=spec["grpc_service"],
                name=method_name,
                callers=tuple(m["callers"]),
                retry=m.get("retry", "none"),
                streaming=bool(m.get("streaming", False)),
            )
            for method_name, m in spec["methods"].items()
        )
        services[name] = Service(
            name=name,
            grpc_service=spec["grpc_service"],
            app_port=int(spec["app_port"]),
            replicas=int(spec.get("replicas", 1)),
            upstreams=tuple(spec.get("upstreams", ())),
            methods=methods,
        )
    common = tuple(
        Method(service=svc, name="*", callers=tuple(m["callers"]), streaming=bool(m.get("streaming", False)))
        for svc, m in raw.get("common_methods", {}).items()
    )
    topo = Topology(
        trust_domain=raw["trust_domain"],
        namespace=raw["namespace"],
        policies=policies,
        stream_idle_timeout_s=_duration(raw["policies"]["streaming"]["stream_idle_timeout"]) or 300.0,
        edge_port=int(raw["edge"]["port"]),
        edge_admin_port=int(raw["edge"]["admin_port"]),
        edge_rate_limit=dict(raw["edge"].get("rate_limit", {})),
        services=services,
        common_methods=common,
    )
    _check(topo)
    return topo


def _check(topo: Topology) -> None:
    known = set(topo.identities())
    for svc in topo.services.values():
        for up in svc.upstreams:
            if up not in topo.services:
                raise ValueError(f"{svc.name}: unknown upstream {up!r}")
        for m in svc.methods:
            if unknown := set(m.callers) - known:
                raise ValueError(f"{m.path}: unknown callers {sorted(unknown)}")
            if m.retry not in ("none", "read", "idempotent"):
                raise ValueError(f"{m.path}: retry must be none, read or idempotent")
            # A caller other than the edge must list the callee as an upstream, or it has no route to it.
            for caller in set(m.callers) - {EDGE}:
                if svc.name not in topo.services[caller].upstreams:
                    raise ValueError(f"{m.path}: caller {caller} does not list {svc.name} as upstream")

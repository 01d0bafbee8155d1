"""The mesh topology: one YAML file (shop_mesh/mesh/topology.yaml) that every rendered config derives from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shop_mesh.mesh import contracts
from shop_mesh.mesh.auth import AuthPolicy, auth_policy
from shop_mesh.mesh.contracts import ContractMethod, RetryClass

TOPOLOGY_PATH = Path(__file__).with_name("topology.yaml")
EDGE = "edge"
# How a service's RPCs are looked up (tests pass a fake built from a hand-made descriptor).
Describe = Callable[[str], dict[str, ContractMethod]]


@dataclass(frozen=True)
class RoutePolicy:
    """What the mesh does for one class of route: timeouts and retries."""

    timeout_s: float | None
    per_try_timeout_s: float | None = None
    num_retries: int = 0
    retry_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One RPC as the mesh sees it: its full gRPC path, who may call it (topology), how it is retried and
    whether it streams (both from the contract's descriptor)."""

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
    # Unary calls in flight the service's sidecar lets through to its app (inbound `local_app`
    # breaker); None = the mesh-wide `upstream.circuit_breakers.max_requests`. Beyond it the sidecar
    # answers RESOURCE_EXHAUSTED before TLS-terminated work reaches the app's gRPC stack.
    inbound_max_requests: int | None = None

    def callers(self) -> set[str]:
        """Every identity that may call anything of this service (its own methods only)."""
        return {c for m in self.methods for c in m.callers}


@dataclass(frozen=True)
class Breakers:
    """One cluster's circuit-breaker thresholds. Retries are bounded by a budget (a share of the
    requests in flight), not a fixed count, so retries cannot multiply an overload."""

    max_connections: int = 1024
    max_pending_requests: int = 256
    max_requests: int = 1024
    retry_budget_percent: float = 20.0
    min_retry_concurrency: int = 10


@dataclass(frozen=True)
class EdgeLimits:
    """What one client can hold at the edge: HTTP/2 streams per downstream connection, connections."""

    max_concurrent_streams_per_connection: int = 1024
    max_connections: int = 50000


@dataclass(frozen=True)
class UpstreamPolicy:
    """How every sidecar and the edge treat an upstream cluster (mesh-wide, from `upstream:`)."""

    connect_timeout_s: float = 1.0
    # Active gRPC health checks: a draining app (NOT_SERVING) leaves the rotation within ~interval.
    hc_interval_s: float = 1.0
    # A cluster no call has used yet checks its healthy hosts this often (Envoy's
    # no_traffic_healthy_interval): a caller's idle clusters cost its callees little.
    hc_idle_interval_s: float = 5.0
    hc_timeout_s: float = 1.0
    hc_unhealthy_threshold: int = 2
    hc_healthy_threshold: int = 1
    # Outlier detection: passive ejection of replicas that keep failing.
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    outlier_interval_s: float = 1.0
    base_ejection_time_s: float = 10.0
    max_ejection_percent: int = 50
    # Circuit breakers, per Envoy: unary calls and long-lived streams each get their own cluster
    # (`<service>` and `<service>-streams`, inbound `local_app` and `local_app_streams`) and budget.
    breakers: Breakers = field(default_factory=lambda: Breakers())
    stream_breakers: Breakers = field(
        default_factory=lambda: Breakers(max_pending_requests=4096, max_requests=4096)
    )
    # Streams per upstream HTTP/2 connection of a stream cluster (more streams: more connections).
    max_streams_per_connection: int = 256
    # HTTP/2 keepalive pings on mesh connections: dead peers are noticed without traffic.
    keepalive_interval_s: float = 10.0
    keepalive_timeout_s: float = 5.0


@dataclass(frozen=True)
class K8sLayout:
    """The sidecar contract inside a Kubernetes pod (shared with k8s/render.py)."""

    inbound_port: int = 15443
    admin_port: int = 15000
    outbound_ports: dict[str, int] = field(default_factory=dict)
    cert_dir: str = "/etc/envoy/certs"
    config_dir: str = "/etc/envoy/config"
    endpoints_dns: str = "{service}-mesh.{namespace}.svc.cluster.local"


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
    upstream: UpstreamPolicy = field(default_factory=UpstreamPolicy)
    k8s: K8sLayout = field(default_factory=K8sLayout)
    # The service the edge sends grpc.reflection.* (and header-less health checks) to.
    edge_reflection_service: str = "order"
    # Header that routes grpc.health.v1 at the edge to one service: `x-shop-service: user`.
    edge_service_header: str = "x-shop-service"
    streaming_policy: RoutePolicy = field(default_factory=lambda: RoutePolicy(timeout_s=None))
    edge_limits: EdgeLimits = field(default_factory=EdgeLimits)
    # End-user authentication at the edge and who may assert end-user identity (shop_mesh/mesh/auth.py).
    auth: AuthPolicy = field(default_factory=AuthPolicy)

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


def load(path: Path = TOPOLOGY_PATH, describe: Describe = contracts.methods) -> Topology:
    """Parse the topology and join it with the contracts: every RPC of the protos, and nothing else,
    must be listed (with its callers); retry class and streaming come from the descriptors."""
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
        methods = _methods(spec["grpc_service"], spec["methods"], describe)
        services[name] = Service(
            name=name,
            grpc_service=spec["grpc_service"],
            app_port=int(spec["app_port"]),
            replicas=int(spec.get("replicas", 1)),
            upstreams=tuple(spec.get("upstreams", ())),
            methods=methods,
            inbound_max_requests=_positive(spec, "inbound_max_requests", name),
        )
    common = tuple(
        # Whole standard services (health, reflection): read-only, and they may hold a stream open
        # (Health/Watch), so they are retried like reads, with the stream policy.
        Method(service=svc, name="*", callers=tuple(m["callers"]), retry="read", streaming=True)
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
        upstream=_upstream_policy(raw.get("upstream", {})),
        k8s=_k8s_layout(raw.get("k8s", {}), services),
        edge_reflection_service=str(raw["edge"].get("reflection_service", "order")),
        edge_service_header=str(raw["edge"].get("service_header", "x-shop-service")),
        edge_limits=_edge_limits(raw["edge"].get("limits", {})),
        streaming_policy=RoutePolicy(
            timeout_s=None,
            num_retries=int(raw["policies"]["streaming"].get("num_retries", 0)),
            retry_on=tuple(raw["policies"]["streaming"].get("retry_on", ())),
        ),
        auth=auth_policy(raw.get("auth")),
    )
    _check(topo)
    return topo


def _methods(grpc_service: str, listed: dict[str, Any], describe: Describe) -> tuple[Method, ...]:
    contract = describe(grpc_service)
    if unknown := sorted(set(listed) - set(contract)):
        raise ValueError(f"topology names methods {grpc_service} does not have in the protos: {unknown}")
    if missing := sorted(set(contract) - set(listed)):
        raise ValueError(
            f"topology leaves out RPCs of {grpc_service}: {missing} (list each with its callers)"
        )
    methods = []
    for name, rpc in contract.items():
        spec = listed[name] or {}
        if "streaming" in spec:
            raise ValueError(f"/{grpc_service}/{name}: `streaming` comes from the protos; remove it")
        retry: RetryClass = rpc.retry
        override = spec.get("retry")
        if override is not None:
            # Deployment may switch a method's retries off (e.g. while a bug is investigated), never
            # on: retry safety is the contract's `idempotency_level`.
            if override != "none":
                raise ValueError(
                    f"/{grpc_service}/{name}: retry class comes from the proto's idempotency_level; "
                    "the topology may only say `retry: none`"
                )
            retry = "none"
        methods.append(
            Method(
                service=grpc_service,
                name=name,
                callers=tuple(spec.get("callers", ())),
                retry=retry,
                streaming=rpc.streaming,
            )
        )
    return tuple(methods)


def _positive(spec: dict[str, Any], key: str, service: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"services.{service}.{key}: a positive integer, not {value!r}")
    return value


def _upstream_policy(raw: dict[str, Any]) -> UpstreamPolicy:
    hc = raw.get("health_check", {})
    od = raw.get("outlier_detection", {})
    cb = raw.get("circuit_breakers", {})
    ka = raw.get("keepalive", {})
    d = UpstreamPolicy()

    def dur(spec: dict[str, Any], key: str, default: float) -> float:
        value = _duration(spec.get(key))
        return default if value is None else value

    return UpstreamPolicy(
        connect_timeout_s=dur(raw, "connect_timeout", d.connect_timeout_s),
        hc_interval_s=dur(hc, "interval", d.hc_interval_s),
        hc_idle_interval_s=dur(hc, "idle_interval", d.hc_idle_interval_s),
        hc_timeout_s=dur(hc, "timeout", d.hc_timeout_s),
        hc_unhealthy_threshold=int(hc.get("unhealthy_threshold", d.hc_unhealthy_threshold)),
        hc_healthy_threshold=int(hc.get("healthy_threshold", d.hc_healthy_threshold)),
        consecutive_5xx=int(od.get("consecutive_5xx", d.consecutive_5xx)),
        consecutive_gateway_failure=int(od.get("consecutive_gateway_failure", d.consecutive_gateway_failure)),
        outlier_interval_s=dur(od, "interval", d.outlier_interval_s),
        base_ejection_time_s=dur(od, "base_ejection_time", d.base_ejection_time_s),
        max_ejection_percent=int(od.get("max_ejection_percent", d.max_ejection_percent)),
        breakers=_breakers(cb, d.breakers),
        stream_breakers=_breakers(raw.get("stream_circuit_breakers", {}), d.stream_breakers),
        max_streams_per_connection=int(raw.get("max_streams_per_connection", d.max_streams_per_connection)),
        keepalive_interval_s=dur(ka, "interval", d.keepalive_interval_s),
        keepalive_timeout_s=dur(ka, "timeout", d.keepalive_timeout_s),
    )


def _breakers(raw: dict[str, Any], d: Breakers) -> Breakers:
    if "max_retries" in raw:
        raise ValueError("circuit_breakers.max_retries: use retry_budget (a share of requests in flight)")
    budget = raw.get("retry_budget", {})
    return Breakers(
        max_connections=int(raw.get("max_connections", d.max_connections)),
        max_pending_requests=int(raw.get("max_pending_requests", d.max_pending_requests)),
        max_requests=int(raw.get("max_requests", d.max_requests)),
        retry_budget_percent=float(budget.get("budget_percent", d.retry_budget_percent)),
        min_retry_concurrency=int(budget.get("min_retry_concurrency", d.min_retry_concurrency)),
    )


def _edge_limits(raw: dict[str, Any]) -> EdgeLimits:
    d = EdgeLimits()
    return EdgeLimits(
        max_concurrent_streams_per_connection=int(
            raw.get("max_concurrent_streams_per_connection", d.max_concurrent_streams_per_connection)
        ),
        max_connections=int(raw.get("max_connections", d.max_connections)),
    )


def _k8s_layout(raw: dict[str, Any], services: dict[str, Service]) -> K8sLayout:
    d = K8sLayout()
    # Default: 15000 + position in the topology (user 15001, payment 15002, ...) unless pinned.
    default_ports = {name: d.admin_port + 1 + i for i, name in enumerate(services)}
    return K8sLayout(
        inbound_port=int(raw.get("inbound_port", d.inbound_port)),
        admin_port=int(raw.get("admin_port", d.admin_port)),
        outbound_ports={**default_ports, **{k: int(v) for k, v in raw.get("outbound_ports", {}).items()}},
        cert_dir=str(raw.get("cert_dir", d.cert_dir)),
        config_dir=str(raw.get("config_dir", d.config_dir)),
        endpoints_dns=str(raw.get("endpoints_dns", d.endpoints_dns)),
    )


def _check(topo: Topology) -> None:
    known = set(topo.identities())
    if unknown_asserters := set(topo.auth.asserters) - known:
        raise ValueError(f"auth.asserters: unknown identities {sorted(unknown_asserters)}")
    if topo.edge_reflection_service not in topo.services:
        raise ValueError(f"edge.reflection_service: unknown service {topo.edge_reflection_service!r}")
    if unknown_ports := set(topo.k8s.outbound_ports) - set(topo.services):
        raise ValueError(f"k8s.outbound_ports: unknown services {sorted(unknown_ports)}")
    for svc in topo.services.values():
        for up in svc.upstreams:
            if up not in topo.services:
                raise ValueError(f"{svc.name}: unknown upstream {up!r}")
        for m in svc.methods:
            if unknown := set(m.callers) - known:
                raise ValueError(f"{m.path}: unknown callers {sorted(unknown)}")
            # A caller other than the edge must list the callee as an upstream, or it has no route to it.
            for caller in set(m.callers) - {EDGE}:
                if svc.name not in topo.services[caller].upstreams:
                    raise ValueError(f"{m.path}: caller {caller} does not list {svc.name} as upstream")

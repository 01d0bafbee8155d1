"""The checks a reviewer would otherwise do by hand on the built overlays.

The expected caller -> callee pairs always come from shop_mesh.mesh.topology, never from a list written here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import pytest

from shop_mesh.mesh.topology import EDGE, Method, Topology
from shop_mesh.services.common.server import JOB_STOP_SECONDS
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    Built,
    Obj,
    all_containers,
    build,
    container_env,
    created_secrets,
    named_ports,
    pod_labels,
    pod_spec,
    selector_matches,
    unhashed,
    walk,
)

TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
NAME = "app.kubernetes.io/name"
LINKERD_INBOUND = 4143
ENVOY_INBOUND = 15443
# what the pod gets beyond its own shutdown: the sidecar's exit, closing the database pool
SHUTDOWN_MARGIN_SECONDS = 10


def _workload_name(workload: Obj) -> str:
    return pod_labels(workload)[NAME]


# ----------------------------------------------------------------------------------------------------------
# Deployments: probes, resources, hardening, PDB, HPA, drain
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_probes_and_resource_limits(target: str) -> None:
    built = build(target)
    for workload in built.workloads():
        for c in all_containers(workload):
            where = f"{target} {workload['metadata']['name']}/{c['name']}"
            if c.get("restartPolicy") != "Always" and c in pod_spec(workload).get("initContainers", []):
                continue  # a run-to-completion init container has no probes
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"
            for bound in ("requests", "limits"):
                assert set(c["resources"].get(bound, {})) >= {"cpu", "memory"}, f"{where}: {bound}"


@pytest.mark.parametrize("target", TARGETS)
def test_services_use_native_grpc_probes_on_the_health_service(target: str, topo: Topology) -> None:
    built = build(target)
    for name, svc in topo.services.items():
        app = next(c for c in pod_spec(built.get("Deployment", name))["containers"] if c["name"] == name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert app[probe]["grpc"]["port"] == svc.app_port, f"{name} {probe}"
        assert app["readinessProbe"]["grpc"]["service"] == svc.grpc_service


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_is_hardened(target: str) -> None:
    built = build(target)
    for workload in built.workloads():
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in all_containers(workload):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
            assert "add" not in sc["capabilities"], f"{name}/{c['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_deployment_has_a_pdb_and_an_hpa(target: str) -> None:
    built = build(target)
    for deployment in built.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        labels = pod_labels(deployment)
        pdbs = [
            p for p in built.of_kind("PodDisruptionBudget") if selector_matches(p["spec"]["selector"], labels)
        ]
        assert len(pdbs) == 1, f"{name}: {len(pdbs)} PDBs"
        hpas = [
            h
            for h in built.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert len(hpas) == 1, f"{name}: {len(hpas)} HPAs"
        hpa = hpas[0]["spec"]
        assert hpa["minReplicas"] >= 2, f"{name}: a PDB needs >= 2 replicas to let a node drain"
        containers = {c["name"]: c for c in pod_spec(deployment)["containers"]}
        for metric in hpa["metrics"]:
            # scaling on one container's CPU: that container must exist and request CPU
            assert metric["type"] == "ContainerResource", f"{name}: sidecars would skew pod CPU"
            container = containers[metric["containerResource"]["container"]]
            assert "cpu" in container["resources"]["requests"]
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns spec.replicas"


@pytest.mark.parametrize("target", TARGETS)
def test_termination_grace_covers_the_drain(target: str, topo: Topology) -> None:
    built = build(target)
    for name in topo.services:
        deployment = built.get("Deployment", name)
        spec = pod_spec(deployment)
        app = next(c for c in spec["containers"] if c["name"] == name)
        drain = int(container_env(built, app)["GRACE_PERIOD_SECONDS"])
        pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        # the kubelet's clock starts at preStop; after it: the drain, then the background jobs' bounded
        # stop, then the native sidecar's own exit: equal would kill a pod that shuts down on time
        needed = pre_stop + drain + JOB_STOP_SECONDS
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= needed + SHUTDOWN_MARGIN_SECONDS, f"{name}: {grace}s for {needed}s of shutdown"


# ----------------------------------------------------------------------------------------------------------
# Services
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_service_port_is_named_with_an_app_protocol(target: str, topo: Topology) -> None:
    built = build(target)
    for service in built.of_kind("Service"):
        for port in service["spec"]["ports"]:
            assert port.get("name") and port.get("appProtocol"), f"{service['metadata']['name']}: {port}"
    for name, svc in topo.services.items():
        (port,) = built.get("Service", name)["spec"]["ports"]
        assert port["name"] == "grpc" and port["port"] == svc.app_port
        assert port["appProtocol"] == "kubernetes.io/h2c"


# ----------------------------------------------------------------------------------------------------------
# NetworkPolicies: evaluated like a CNI would, then compared with the topology
# ----------------------------------------------------------------------------------------------------------
def _peer_matches(peer: Obj, labels: dict[str, str]) -> bool:
    """Does a NetworkPolicy peer match a pod of this (the shop) namespace?"""
    if "ipBlock" in peer:
        return True  # pod IPs are in any ipBlock we would write (0.0.0.0/0); be conservative
    ns = peer.get("namespaceSelector")
    if ns is not None and not selector_matches(ns, {"kubernetes.io/metadata.name": "shop"}):
        return False
    pods = peer.get("podSelector")
    return pods is None or selector_matches(pods, labels)


def _port_matches(rule_ports: list[Obj] | None, port: int, dst: Obj) -> bool:
    if not rule_ports:
        return True
    names = named_ports(dst)
    for p in rule_ports:
        if "port" not in p:
            return True
        value = p["port"]
        number = names.get(value) if isinstance(value, str) else int(value)
        if number is not None and number <= port <= int(p.get("endPort", number)):
            return True
    return False


def _allowed(built: Built, src: Obj, dst: Obj, port: int) -> bool:
    policies = built.of_kind("NetworkPolicy")
    src_labels, dst_labels = pod_labels(src), pod_labels(dst)

    def direction(kind: str, owner: dict[str, str], other: dict[str, str], key: str) -> bool:
        selecting = [
            p
            for p in policies
            if kind in p["spec"]["policyTypes"] and selector_matches(p["spec"]["podSelector"], owner)
        ]
        if not selecting:
            return True  # not isolated in this direction
        return any(
            (not rule.get(key) or any(_peer_matches(peer, other) for peer in rule[key]))
            and _port_matches(rule.get("ports"), port, dst)
            for p in selecting
            for rule in p["spec"].get(kind.lower(), [])
        )

    return direction("Egress", src_labels, dst_labels, "to") and direction(
        "Ingress", dst_labels, src_labels, "from"
    )


def _reachable_pairs(built: Built, ports_of: dict[str, list[int]]) -> set[tuple[str, str]]:
    workloads = {_workload_name(w): w for w in built.workloads()}
    return {
        (a, b)
        for a, b in itertools.permutations(workloads, 2)
        if any(_allowed(built, workloads[a], workloads[b], port) for port in ports_of[b])
    }


def _candidate_ports(built: Built) -> dict[str, list[int]]:
    extra = [LINKERD_INBOUND, ENVOY_INBOUND, 4191, 15000]
    return {_workload_name(w): sorted({*named_ports(w).values(), *extra}) for w in built.workloads()}


def _expected_pairs(topo: Topology, built: Built) -> set[tuple[str, str]]:
    pairs = set(topo.edges())
    if any(w["metadata"]["name"].endswith("-db") for w in built.of_kind("StatefulSet")):
        pairs |= {(name, f"{name}-db") for name in topo.services}
    return pairs


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_allow_exactly_the_topology_edges(target: str, topo: Topology) -> None:
    built = build(target)
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in built.of_kind("NetworkPolicy")
    ), "no default-deny policy"
    reachable = _reachable_pairs(built, _candidate_ports(built))
    assert reachable == _expected_pairs(topo, built)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_only_the_port_that_carries_the_mesh(overlay: str, topo: Topology) -> None:
    built = build(f"overlays/{overlay}")
    workloads = {_workload_name(w): w for w in built.workloads()}
    for caller, callee in topo.edges():
        app_port = topo.services[callee].app_port
        src, dst = workloads[caller], workloads[callee]
        if overlay == "envoy":
            # peers reach the sidecar's mTLS listener only; the app port is for kubelet probes
            assert _allowed(built, src, dst, ENVOY_INBOUND), (caller, callee)
            assert not _allowed(built, src, dst, app_port), f"{caller} bypasses {callee}'s sidecar"
        else:
            assert _allowed(built, src, dst, LINKERD_INBOUND), (caller, callee)
    # the edge is the one workload open to anyone, on its own port only
    edge = workloads[EDGE]
    public = [
        p
        for p in built.of_kind("NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], pod_labels(edge))
    ]
    open_rules = [r for p in public for r in p["spec"].get("ingress", []) if not r.get("from")]
    assert open_rules and all(_port_matches(r["ports"], topo.edge_port, edge) for r in open_rules)


# ----------------------------------------------------------------------------------------------------------
# Envoy component
# ----------------------------------------------------------------------------------------------------------
def test_envoy_sidecars_are_native_with_config_and_spiffe_certificates(topo: Topology) -> None:
    built = build("overlays/envoy")
    certs = {c["spec"]["secretName"]: c for c in built.of_kind("Certificate", "cert-manager.io")}
    for identity in topo.identities():
        deployment = built.get("Deployment", identity)
        spec = pod_spec(deployment)
        assert spec["serviceAccountName"] == identity
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret = volumes["mesh-certs"]["secret"]["secretName"]
        cert = certs[secret]["spec"]
        assert cert["uris"] == [topo.spiffe_id(identity)], identity
        assert {"server auth", "client auth"} <= set(cert["usages"])
        issuer = built.get("Issuer", cert["issuerRef"]["name"])
        assert "ca" in issuer["spec"] or "vault" in issuer["spec"]
        config_cm = unhashed(volumes["envoy-config"]["configMap"]["name"])
        if identity == EDGE:
            assert config_cm == "edge-envoy"
            continue
        (sidecar,) = spec["initContainers"]
        assert sidecar["restartPolicy"] == "Always", "Envoy must be a native sidecar"
        mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
        assert mounts["/etc/envoy/certs"] == "mesh-certs"
        assert config_cm == f"envoy-{identity}"
        assert topo.k8s.inbound_port == ENVOY_INBOUND  # the hand-written patches and the bootstraps agree
        assert any(p["containerPort"] == ENVOY_INBOUND for p in sidecar["ports"])
        assert built.get("Service", f"{identity}-mesh")["spec"]["clusterIP"] == "None"


def test_upstream_addresses_follow_the_mesh(topo: Topology) -> None:
    for overlay in ("base", *OVERLAYS):
        built = build(overlay if overlay == "base" else f"overlays/{overlay}")
        for name, svc in topo.services.items():
            app = next(c for c in pod_spec(built.get("Deployment", name))["containers"] if c["name"] == name)
            env = container_env(built, app)
            assert env["HOST"] == "0.0.0.0" and env["PORT"] == str(svc.app_port)
            for up in svc.upstreams:
                addr = env[f"{up.upper()}_SERVICE_ADDR"]
                if overlay == "envoy":
                    # hand-written in components/envoy/kustomization.yaml: must be the sidecar's listener
                    assert addr == f"127.0.0.1:{topo.k8s.outbound_ports[up]}", addr
                else:
                    assert addr == f"{up}.{topo.namespace}.svc.cluster.local:{topo.services[up].app_port}"


def _sidecar_config(topo: Topology, service: str) -> Obj:
    import yaml

    built = build("overlays/envoy")
    config: Obj = yaml.safe_load(built.config_map(f"envoy-{service}")["data"]["envoy.yaml"])
    return config


def _rbac_filters(config: Obj) -> list[Obj]:
    return [
        node["typed_config"]
        for node in walk(config)
        if isinstance(node, dict) and node.get("name") == "envoy.filters.http.rbac" and "typed_config" in node
    ]


def _principal_ids(node: object) -> set[str]:
    return {v for v in walk(node) if isinstance(v, str) and v.startswith("spiffe://")}


def _permission_matches(permission: object, path: str) -> bool:
    for node in walk(permission):
        if not isinstance(node, dict):
            continue
        if node.get("any") is True:
            return True
        for key in ("exact", "prefix"):
            value = node.get(key)
            if not (isinstance(value, str) and value.startswith("/")):
                continue
            if (key == "exact" and path == value) or (key == "prefix" and path.startswith(value)):
                return True
    return False


def _method_path(m: Method) -> str:
    return f"/{m.service}/Check" if m.name == "*" else m.path


def test_envoy_rbac_allows_exactly_the_topology_callers(topo: Topology) -> None:
    identity_of = {topo.spiffe_id(i): i for i in topo.identities()}
    pairs: set[tuple[str, str]] = set()
    for name in topo.services:
        filters = _rbac_filters(_sidecar_config(topo, name))
        assert filters, f"sidecar-{name}: no RBAC filter"
        rules = [f["rules"] for f in filters if "rules" in f]
        assert rules and all(r.get("action", "ALLOW") == "ALLOW" for r in rules), name
        for m in topo.methods_of(name):
            path = _method_path(m)
            allowed = set()
            for rule in rules:
                for policy in rule["policies"].values():
                    if any(_permission_matches(p, path) for p in policy["permissions"]):
                        allowed |= _principal_ids(policy["principals"])
            assert allowed == {topo.spiffe_id(c) for c in m.callers}, f"{name} {path}"
            if m.name != "*":
                pairs |= {(identity_of[a], name) for a in allowed}
    assert pairs == topo.edges()


# ----------------------------------------------------------------------------------------------------------
# Linkerd component
# ----------------------------------------------------------------------------------------------------------
def _identities(auth: Obj) -> set[str]:
    refs = {r["name"] for r in auth["spec"].get("identityRefs", []) if r["kind"] == "ServiceAccount"}
    names = {i.split(".")[0] for i in auth["spec"].get("identities", [])}
    return refs | names


def _route_matches(route: Obj, path: str) -> bool:
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            p = match["path"]
            if (p["type"] == "Exact" and p["value"] == path) or (
                p["type"] == "PathPrefix" and path.startswith(p["value"])
            ):
                return True
    return False


def test_linkerd_authorization_allows_exactly_the_topology_callers(topo: Topology) -> None:
    built = build("overlays/linkerd")
    servers = built.of_kind("Server", "policy.linkerd.io")
    routes = built.of_kind("HTTPRoute", "policy.linkerd.io")
    policies = built.of_kind("AuthorizationPolicy", "policy.linkerd.io")
    mesh_auths = {a["metadata"]["name"]: a for a in built.of_kind("MeshTLSAuthentication")}
    pairs: set[tuple[str, str]] = set()
    for name, svc in topo.services.items():
        labels = pod_labels(built.get("Deployment", name))
        (server,) = [
            s
            for s in servers
            if selector_matches(s["spec"]["podSelector"], labels)
            and s["spec"]["port"] in ("grpc", svc.app_port)
        ]
        assert server["spec"]["accessPolicy"] == "deny"
        server_name = server["metadata"]["name"]
        assert not [p for p in policies if p["spec"]["targetRef"]["name"] == server_name], (
            f"{name}: a policy on the whole Server would allow every route"
        )
        own_routes = [r for r in routes if any(ref["name"] == server_name for ref in r["spec"]["parentRefs"])]
        for m in topo.methods_of(name):
            path = _method_path(m)
            matching = [r["metadata"]["name"] for r in own_routes if _route_matches(r, path)]
            assert len(matching) == 1, f"{name} {path}: routes {matching}"
            allowed: set[str] = set()
            for p in policies:
                if p["spec"]["targetRef"] == {
                    "group": "policy.linkerd.io",
                    "kind": "HTTPRoute",
                    "name": matching[0],
                }:
                    for ref in p["spec"]["requiredAuthenticationRefs"]:
                        if ref["kind"] == "MeshTLSAuthentication":
                            allowed |= _identities(mesh_auths[ref["name"]])
                        else:
                            assert m.service == "grpc.health.v1.Health", f"{path}: unauthenticated access"
            assert allowed == set(m.callers), f"{name} {path}"
            if m.name != "*":
                pairs |= {(c, name) for c in allowed}
    assert pairs == topo.edges()


def _grpc_route_covers(route: Obj, m: Method) -> bool:
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            method = match["method"]
            if method["service"] == m.service and method.get("method") in (
                None,
                m.name if m.name != "*" else None,
            ):
                return True
    return False


def test_linkerd_routes_carry_the_topology_retries_and_timeouts(topo: Topology) -> None:
    built = build("overlays/linkerd")
    routes = built.of_kind("GRPCRoute", "gateway.networking.k8s.io")
    assert not built.of_kind("ServiceProfile"), "retries/timeouts live on routes, not ServiceProfiles"
    for name, svc in topo.services.items():
        own = [
            r
            for r in routes
            if r["spec"]["parentRefs"]
            == [{"group": "", "kind": "Service", "name": name, "port": svc.app_port}]
        ]
        for m in topo.methods_of(name):
            (route,) = [r for r in own if _grpc_route_covers(r, m)]
            ann = route["metadata"].get("annotations", {})
            if m.streaming or m.name == "*":
                # whole-service wildcards (health Watch, reflection) may hold a stream open too
                assert "timeout.linkerd.io/request" not in ann, f"{m.path}: a stream has no request timeout"
                assert ann["timeout.linkerd.io/idle"] == _go_duration(topo.stream_idle_timeout_s)
                policy = topo.streaming_policy
            else:
                policy = topo.policies[m.retry]
                assert ann["timeout.linkerd.io/request"] == _go_duration(policy.timeout_s), m.path
            if policy.num_retries:
                assert ann["retry.linkerd.io/limit"] == str(policy.num_retries), m.path
                assert "unavailable" in ann["retry.linkerd.io/grpc"].split(","), m.path
            else:
                assert "retry.linkerd.io/grpc" not in ann, f"{m.path} must never be retried"


def _go_duration(seconds: float | None) -> str:
    assert seconds is not None
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def test_linkerd_injects_every_app_pod_and_authorizes_probes_and_scrapes() -> None:
    built = build("overlays/linkerd")
    (namespace,) = built.of_kind("Namespace")
    annotations = namespace["metadata"]["annotations"]
    assert annotations["linkerd.io/inject"] == "enabled"
    assert annotations["config.linkerd.io/default-inbound-policy"] == "deny"
    auths = {a["metadata"]["name"]: a for a in built.of_kind("MeshTLSAuthentication")}
    prometheus = auths["linkerd-viz-prometheus"]["spec"]["identityRefs"]
    assert prometheus == [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "linkerd-viz"}]


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL component: credentials only through Secret files
# ----------------------------------------------------------------------------------------------------------
def _literal_values(objects: Iterable[Obj]) -> Iterable[str]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in all_containers(o):
                for var in c.get("env", []):
                    yield f"{var['name']}={var.get('value', '')}"
        elif o["kind"] == "ConfigMap":
            yield from (f"{k}={v}" for k, v in (o.get("data") or {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_database_credentials_come_from_secret_files_never_literals(overlay: str, topo: Topology) -> None:
    built = build(f"overlays/{overlay}")
    assert not built.of_kind("Secret"), "no Secret may be committed: create-secrets.sh makes them"
    for value in _literal_values(built.objects):
        assert not re.search(r"postgres(ql)?(\+\w+)?://", value), value
        assert not re.search(r"PASSWORD=(?!$)", value) or value.startswith("POSTGRES_PASSWORD_FILE="), value
    for name in topo.services:
        deployment = built.get("Deployment", name)
        app = next(c for c in pod_spec(deployment)["containers"] if c["name"] == name)
        env = container_env(built, app)
        assert "DATABASE_URL" not in env
        url_file = env["DATABASE_URL_FILE"]
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        (mount,) = [m for m in app["volumeMounts"] if url_file.startswith(m["mountPath"] + "/")]
        assert volumes[mount["name"]]["secret"]["secretName"] == f"{name}-db"
        db = built.get("StatefulSet", f"{name}-db")
        assert db["spec"]["volumeClaimTemplates"], "PostgreSQL needs a PersistentVolumeClaim"
        pg = pod_spec(db)["containers"][0]
        pg_env = {v["name"]: v.get("value") for v in pg["env"]}
        assert "POSTGRES_PASSWORD" not in pg_env and pg_env["POSTGRES_PASSWORD_FILE"]


# ----------------------------------------------------------------------------------------------------------
# References: nothing points at an object, port or Secret that does not exist
# ----------------------------------------------------------------------------------------------------------
def _names(built: Built, kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in built.of_kind(kind)}


@pytest.mark.parametrize("target", TARGETS)
def test_every_reference_resolves(target: str) -> None:
    built = build(target)
    issued = {c["spec"]["secretName"] for c in built.of_kind("Certificate")}
    created_by_script = {w["metadata"]["name"] for w in built.of_kind("StatefulSet")}  # <svc>-db Secrets
    created_by_script |= {s["metadata"]["name"] for s in created_secrets(K8S / "base/create-secrets.sh")}
    for workload in built.workloads():
        spec = pod_spec(workload)
        where = workload["metadata"]["name"]
        assert spec.get("serviceAccountName", "default") in _names(built, "ServiceAccount") | {"default"}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in _names(built, "ConfigMap"), where
            if "secret" in volume:
                assert volume["secret"]["secretName"] in issued | created_by_script, where
        for c in all_containers(workload):
            for var in c.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["name"] in created_by_script, (where, var["name"])
        mounts = {m["name"] for c in all_containers(workload) for m in c.get("volumeMounts", [])}
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | templates, where
    for service in built.of_kind("Service"):
        selected = [
            w
            for w in built.workloads()
            if selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            for w in selected:
                ports = named_ports(w)
                assert target_port in ports or target_port in ports.values(), (
                    service["metadata"]["name"],
                    port,
                )
    for cert in built.of_kind("Certificate"):
        assert cert["spec"]["issuerRef"]["name"] in _names(built, "Issuer")
    for issuer in built.of_kind("Issuer"):
        if "ca" in issuer["spec"]:
            assert issuer["spec"]["ca"]["secretName"] in issued
    for route in built.of_kind("GRPCRoute") + built.of_kind("HTTPRoute"):
        for ref in route["spec"]["parentRefs"]:
            assert ref["name"] in _names(built, ref["kind"]), route["metadata"]["name"]
        for rule in route["spec"]["rules"]:
            for backend in rule.get("backendRefs", []):
                assert backend["name"] in _names(built, "Service")
    for policy in built.of_kind("AuthorizationPolicy"):
        ref = policy["spec"]["targetRef"]
        assert ref["name"] in _names(built, ref["kind"]), policy["metadata"]["name"]
        for auth in policy["spec"]["requiredAuthenticationRefs"]:
            assert auth["name"] in _names(built, auth["kind"]), policy["metadata"]["name"]
    for auth in built.of_kind("MeshTLSAuthentication"):
        for ref in auth["spec"].get("identityRefs", []):
            if "namespace" not in ref:
                assert ref["name"] in _names(built, "ServiceAccount"), auth["metadata"]["name"]
    for server in built.of_kind("Server"):
        selected = [
            w for w in built.workloads() if selector_matches(server["spec"]["podSelector"], pod_labels(w))
        ]
        if server["spec"]["port"] == "linkerd-admin":
            continue  # the injected proxy's port: not in the manifests
        assert selected and all(server["spec"]["port"] in named_ports(w) for w in selected), server

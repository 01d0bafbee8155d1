"""The Linkerd review (issue 13) and the k8s/ layout: hand-written YAML, generated files kept apart.

Linkerd facts checked against upstream linkerd/linkerd2 (tag edge-25.4.4, the 2.18 release):
pkg/k8s/labels.go names the native-sidecar annotation `config.alpha.linkerd.io/...` (the `config.beta`
name appeared later, in commit d3788f6a6 of Oct 2025), and charts/linkerd-control-plane/values.yaml sets
`policyController.probeNetworks` to 0.0.0.0/0 and ::/0.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s.render import GENERATED_DIRS, HEADER, render_all
from shop_mesh.mesh.topology import EDGE, Topology
from tests.k8s.manifests import K8S, OVERLAYS, REPO, build, pod_spec, tool
from tests.support import free_port

LINKERD_DEFAULT_PROBE_NETWORKS = {"0.0.0.0/0", "::/0"}
NATIVE_SIDECAR_2_18 = "config.alpha.linkerd.io/proxy-enable-native-sidecar"


def test_linkerd_namespace_asks_for_native_sidecars_by_the_name_2_18_reads() -> None:
    namespace = build("overlays/linkerd").get("Namespace", "shop")
    annotations = namespace["metadata"]["annotations"]
    assert annotations.get(NATIVE_SIDECAR_2_18) == "true"
    # the beta name alone is silently ignored by 2.18: the proxy would run as a plain sidecar
    assert "config.beta.linkerd.io/proxy-enable-native-sidecar" not in annotations


def test_kubelet_probe_authorization_matches_linkerds_default_probe_networks(topo: Topology) -> None:
    built = build("overlays/linkerd")
    auth = built.get("NetworkAuthentication", "kubelet-probes")
    assert {n["cidr"] for n in auth["spec"]["networks"]} == LINKERD_DEFAULT_PROBE_NETWORKS
    # and every service's health route is open to it (the gRPC probes are not meshed)
    for name in topo.services:
        policy = built.get("AuthorizationPolicy", f"{name}-kubelet-probes")
        refs = policy["spec"]["requiredAuthenticationRefs"]
        assert refs == [
            {"group": "policy.linkerd.io", "kind": "NetworkAuthentication", "name": "kubelet-probes"}
        ]


def test_linkerd_routes_are_gateway_api_v1_grpcroutes() -> None:
    routes = build("overlays/linkerd").of_kind("GRPCRoute")
    assert routes
    assert {r["apiVersion"] for r in routes} == {"gateway.networking.k8s.io/v1"}


def test_deploy_docs_require_linkerd_2_18_and_the_gateway_api_helm_switch() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    assert "Linkerd ≥ 2.18" in text
    assert "installGatewayAPI=false" in text
    assert "2.16" not in text.replace("2.16/2.17", ""), "2.16 is only named as unsupported"
    assert "kustomize edit set image shop-mesh=REGISTRY/shop-mesh@sha256:" in text


def _routes_on_port(envoy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    for listener in envoy["static_resources"]["listeners"]:
        if listener["address"]["socket_address"]["port_value"] == port:
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            routes: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
            return routes
    raise AssertionError(f"no Envoy listener on port {port}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_edge_probes_ask_envoy_over_http_not_tcp(overlay: str) -> None:
    """Each probe is an HTTP GET that Envoy's own listener routes to admin /ready (not just a TCP accept)."""
    built = build(f"overlays/{overlay}")
    edge = built.get("Deployment", EDGE)
    container = next(c for c in pod_spec(edge)["containers"] if c["name"] == "envoy")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    envoy = yaml.safe_load(built.config_map("edge-envoy")["data"]["envoy.yaml"])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert "tcpSocket" not in probe, f"{overlay}: edge {kind} is tcpSocket"
        get = probe["httpGet"]
        routes = _routes_on_port(envoy, ports[get["port"]])
        served = [r for r in routes if r["match"].get("path") == get["path"]]
        assert served and served[0]["route"]["cluster"] == "envoy_admin", f"{overlay}: {kind} {get}"
        # admin's /ready on its own address, which the route's cluster points at
        admin = envoy["admin"]["address"]["socket_address"]
        clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
        endpoint = clusters["envoy_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert endpoint["endpoint"]["address"]["socket_address"] == admin


# ----------------------------------------------------------------------------------------------------------
# layout: what is generated, and only that, sits in generated/ folders
# ----------------------------------------------------------------------------------------------------------
BASE_GENERATED = {"generated/network-policies.yaml", "generated/edge-envoy.yaml"}


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_base_has_no_generated_object_outside_the_listed_generated_files() -> None:
    base = K8S / "base"
    generated = {f for f in _files(base) if f.startswith("generated/")}
    assert generated == BASE_GENERATED
    for rel in sorted(_files(base) - generated):
        assert "GENERATED" not in (base / rel).read_text(), f"k8s/base/{rel} is hand-written"
    # the Deployments, Services, PDBs and HPAs come from hand-written files
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    hand_written = [r for r in kustomization["resources"] if not r.startswith("generated/")]
    kinds = {doc["kind"] for r in hand_written for doc in yaml.safe_load_all((base / r).read_text()) if doc}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    generated_kinds = {
        doc["kind"]
        for r in kustomization["resources"]
        if r.startswith("generated/")
        for doc in yaml.safe_load_all((base / r).read_text())
        if doc
    }
    assert generated_kinds == {"NetworkPolicy"}


def test_every_generated_file_is_in_a_generated_folder_and_marked(topo: Topology) -> None:
    rendered = render_all(topo)
    for rel, text in rendered.items():
        assert "/generated/" in f"/{rel}", rel
        assert text.startswith(HEADER), rel
    # and nothing outside those folders carries the header (a hand-written file says so by not having it)
    for path in K8S.rglob("*.yaml"):
        rel = str(path.relative_to(K8S))
        if str(path.parent.relative_to(K8S)) not in GENERATED_DIRS:
            assert not path.read_text().startswith("# GENERATED"), rel


# ----------------------------------------------------------------------------------------------------------
# the edge probe against a real Envoy
# ----------------------------------------------------------------------------------------------------------
def _on_loopback(node: Any, ports: dict[int, int]) -> None:
    """Listener and admin sockets moved to 127.0.0.1 and free ports (upstream addresses are untouched)."""
    if isinstance(node, dict):
        address = node.get("socket_address")
        if isinstance(address, dict) and address.get("port_value") in ports:
            address["address"] = "127.0.0.1"
            address["port_value"] = ports[address["port_value"]]
        for value in node.values():
            _on_loopback(value, ports)
    elif isinstance(node, list):
        for value in node:
            _on_loopback(value, ports)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_edge_readiness_probe_is_answered_by_envoy(tmp_path: Path) -> None:
    """What the kubelet sees: GET /ready on envoy-metrics is 200 LIVE; the rest of admin stays unreachable."""
    built = build("overlays/linkerd")  # the plaintext edge: it starts without mesh certificates
    edge = built.get("Deployment", EDGE)
    container = next(c for c in pod_spec(edge)["containers"] if c["name"] == "envoy")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    envoy = yaml.safe_load(built.config_map("edge-envoy")["data"]["envoy.yaml"])
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    ports = {port: free_port() for port in {*named.values(), admin_port}}
    _on_loopback(envoy, ports)
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [tool("envoy"), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{ports[named[probe['port']]]}"
    try:
        deadline = time.monotonic() + 30
        status, body = 0, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(base + probe["path"])
            except OSError:
                status = 0  # not listening yet
            if status == 200:
                break
            time.sleep(0.2)
        assert (status, body.strip()) == (200, "LIVE"), (tmp_path / "envoy.log").read_text()[-2000:]
        assert _get(base + "/config_dump")[0] == 404  # only /ready and the stats are routed to admin
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()

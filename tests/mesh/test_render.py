"""Rendered Envoy configs: every one passes `envoy --mode validate`, and they say what the topology says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import render
from mesh.topology import load
from mesh.validate import bootstraps, validate_file
from tests.support import REPO

TOPO = load()


def _render(tmp_path: Path, target: str) -> Path:
    out = tmp_path / target
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "render", "--target", target, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("target", ["local", "k8s"])
def test_every_rendered_config_passes_envoy_validate(tmp_path: Path, target: str) -> None:
    out = _render(tmp_path, target)
    paths = bootstraps(out)
    # Three sidecars and the edge.
    assert len(paths) == 4, paths
    for path in paths:
        result = validate_file(path, TOPO)
        assert result.ok, f"{path}:\n{result.output[-3000:]}"


def test_k8s_target_writes_the_files_the_k8s_component_mounts(tmp_path: Path) -> None:
    out = _render(tmp_path, "k8s")
    names = {p.name for p in out.iterdir()}
    assert {"sidecar-user.yaml", "sidecar-order.yaml", "sidecar-payment.yaml", "edge.yaml"} <= names
    assert {"sds-identity.yaml", "sds-ca.yaml"} <= names
    order = yaml.safe_load((out / "sidecar-order.yaml").read_text())
    listeners = {
        lst["name"]: lst["address"]["socket_address"] for lst in order["static_resources"]["listeners"]
    }
    assert listeners["inbound"] == {"address": "0.0.0.0", "port_value": 15443}
    assert listeners["outbound_user"] == {"address": "127.0.0.1", "port_value": 15001}
    assert listeners["outbound_payment"] == {"address": "127.0.0.1", "port_value": 15003}
    assert order["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    clusters = {c["name"]: c for c in order["static_resources"]["clusters"]}
    assert clusters["user"]["type"] == "STRICT_DNS"
    endpoint = clusters["user"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "user-mesh.shop.svc.cluster.local",
        "port_value": 15443,
    }
    assert clusters["local_app"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ] == {"address": "127.0.0.1", "port_value": TOPO.services["order"].app_port}
    sds = yaml.safe_load((out / "sds-identity.yaml").read_text())
    cert = sds["resources"][0]["tls_certificate"]
    assert cert["certificate_chain"]["filename"] == "/etc/envoy/certs/tls.crt"
    assert cert["watched_directory"]["path"] == "/etc/envoy/certs"


def _routes(config: dict[str, Any], listener: str) -> dict[str, dict[str, Any]]:
    lst = next(x for x in config["static_resources"]["listeners"] if x["name"] == listener)
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    return {r["name"]: r["route"] for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]}


def test_route_policy_follows_the_topology() -> None:
    order = render.k8s_sidecar(TOPO, "order")
    routes = _routes(order, "outbound_payment")
    # request_id mutations and reads: retried on UNAVAILABLE, with per-try timeouts.
    authorize = routes["/shop.payment.v1.PaymentService/AuthorizePayment"]
    assert "unavailable" in authorize["retry_policy"]["retry_on"]
    policy = TOPO.policies["idempotent"]
    assert authorize["retry_policy"]["per_try_timeout"] == f"{policy.per_try_timeout_s:g}s"
    assert authorize["timeout"] == f"{policy.timeout_s:g}s"
    assert authorize["retry_policy"]["num_retries"] == policy.num_retries
    assert "retry_policy" in routes["/shop.payment.v1.PaymentService/GetPayment"]
    # Streams: no route timeout, a deliberate idle timeout, never a per-try timeout.
    watch = routes["/shop.payment.v1.PaymentService/WatchPaymentEvents"]
    assert watch["timeout"] == "0s"
    assert watch["idle_timeout"] == f"{TOPO.stream_idle_timeout_s:g}s"
    assert "per_try_timeout" not in watch.get("retry_policy", {})


def test_a_route_of_class_none_is_never_retried() -> None:
    method = next(m for m in TOPO.services["user"].methods if m.name == "DeleteUser")
    from dataclasses import replace

    route = render.method_route(TOPO, replace(method, retry="none"), "user")
    assert "retry_policy" not in route["route"]


def test_inbound_requires_client_certs_and_rbac_names_the_callers() -> None:
    payment = render.k8s_sidecar(TOPO, "payment")
    inbound = next(x for x in payment["static_resources"]["listeners"] if x["name"] == "inbound")
    chain = inbound["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
    filters = chain["filters"][0]["typed_config"]["http_filters"]
    rbac = next(f for f in filters if f["name"] == "envoy.filters.http.rbac")["typed_config"]["rules"]
    authorize = rbac["policies"]["/shop.payment.v1.PaymentService/AuthorizePayment"]
    assert authorize["principals"] == [
        {"authenticated": {"principal_name": {"exact": "spiffe://shop.local/ns/shop/sa/order"}}}
    ]


def test_admin_interfaces_bind_loopback_only(tmp_path: Path) -> None:
    for target in ("local", "k8s"):
        for path in bootstraps(_render(tmp_path, target)):
            config = yaml.safe_load(path.read_text())
            assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", path


def test_edge_rate_limits_and_routes_reflection_to_the_reflecting_service() -> None:
    edge = render.k8s_edge(TOPO)
    hcm = edge["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rl = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit")
    assert rl["typed_config"]["token_bucket"]["max_tokens"] == TOPO.edge_rate_limit["max_tokens"]
    routes = _routes(edge, "edge")
    assert routes["/grpc.reflection.v1.ServerReflection/*"]["cluster"] == TOPO.edge_reflection_service
    assert routes["/grpc.reflection.v1.ServerReflection/*"]["timeout"] == "0s"
    assert routes["health-user"]["cluster"] == "user"


def test_edge_with_tls_for_clients_validates(tmp_path: Path) -> None:
    from mesh import local

    run = local.RunDir(tmp_path / "run")
    run.make()
    local.prepare_pki(TOPO, run)
    for service in TOPO.services:
        local.write_eds(run, service, [])
    path = run.envoy / "edge-tls.yaml"
    render.write_yaml(
        path, render.edge(TOPO, local.edge_plan(run, TOPO.edge_port, TOPO.edge_admin_port, tls=True))
    )
    listener = yaml.safe_load(path.read_text())["static_resources"]["listeners"][0]
    assert listener["filter_chains"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    result = validate_file(path, TOPO)
    assert result.ok, result.output[-3000:]


def _http_filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f.get("typed_config", {}) for f in hcm["http_filters"]}


def test_kubernetes_edges_verify_tokens_with_the_identity_providers_jwks(tmp_path: Path) -> None:
    """Both Kubernetes edges (Envoy overlay and the base/Linkerd one) verify the configured issuer."""
    from k8s.render import edge_envoy_plain

    out = _render(tmp_path, "k8s")
    settings = TOPO.auth.k8s
    for config in (yaml.safe_load((out / "edge.yaml").read_text()), edge_envoy_plain(TOPO)):
        filters = _http_filters(config)
        names = list(filters)
        # Client copies of the identity headers go before the token is verified; roles after it.
        assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.jwt_authn")
        provider = filters["envoy.filters.http.jwt_authn"]["providers"]["shop"]
        assert (provider["issuer"], provider["audiences"]) == (settings.issuer, [settings.audience])
        assert provider["remote_jwks"]["http_uri"]["uri"] == settings.jwks_uri
        assert provider["remote_jwks"]["cache_duration"] == "600s"
        assert provider["forward"] is False
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        tls = clusters["jwks_idp"]["transport_socket"]["typed_config"]
        assert tls["sni"] == "keycloak.example.com"
        rbac = filters["shop.edge_auth_rbac"]["rules"]
        assert rbac["action"] == "DENY" and set(rbac["policies"]) == {"subject-required", "admin-only"}


def test_sidecars_refuse_identity_headers_from_non_asserters(tmp_path: Path) -> None:
    out = _render(tmp_path, "k8s")
    for name in TOPO.services:
        config = yaml.safe_load((out / f"sidecar-{name}.yaml").read_text())
        policy = _http_filters(config)["shop.identity_header_rbac"]["rules"]["policies"]
        allowed = policy["identity-headers-from-non-asserter"]["principals"][0]["not_id"]["or_ids"]["ids"]
        assert {p["authenticated"]["principal_name"]["exact"] for p in allowed} == {
            TOPO.spiffe_id("edge"),
            TOPO.spiffe_id("order"),
        }


def test_local_edge_reads_the_dev_jwks_the_token_command_signs_for(tmp_path: Path) -> None:
    out = _render(tmp_path, "local")
    edge = yaml.safe_load((out / "envoy" / "edge.yaml").read_text())
    provider = _http_filters(edge)["envoy.filters.http.jwt_authn"]["providers"]["shop"]
    jwks = Path(provider["local_jwks"]["filename"])
    assert jwks == out / "pki" / "jwt" / "jwks.json" and jwks.exists()
    assert provider["issuer"] == TOPO.auth.local.issuer


def test_unknown_asserter_is_a_topology_error(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "mesh" / "topology.yaml").read_text())
    raw["auth"]["asserters"] = ["edge", "mallory"]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="mallory"):
        load(path)

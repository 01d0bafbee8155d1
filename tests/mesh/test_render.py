"""Rendered Envoy configs: every one passes `envoy --mode validate`, and they say what the topology says."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from shop.user.v1 import user_pb2

from shop_mesh.mesh import contracts, render
from shop_mesh.mesh.render_metrics import STATS_LISTENER
from shop_mesh.mesh.topology import TOPOLOGY_PATH, load
from shop_mesh.mesh.validate import bootstraps, validate_file
from tests.support import REPO

TOPO = load()


def _render(tmp_path: Path, target: str, topology: Path | None = None) -> Path:
    out = tmp_path / target
    chosen = [] if topology is None else ["--topology", str(topology)]
    proc = subprocess.run(
        [sys.executable, "-m", "shop_mesh.mesh", *chosen, "render", "--target", target, "--out", str(out)],
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
    return {
        r["name"]: r.get("route", {}) for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]
    }


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
    route = render.method_route(TOPO, replace(method, retry="none"), "user")
    assert "retry_policy" not in route["route"]


def _topology_with(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    raw = yaml.safe_load(TOPOLOGY_PATH.read_text())
    edit(raw)
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_topology_lists_exactly_the_rpcs_of_the_protos(tmp_path: Path) -> None:
    # The shipped topology and the generated descriptors agree, method for method.
    for svc in TOPO.services.values():
        assert {m.name for m in svc.methods} == set(contracts.methods(svc.grpc_service)), svc.name

    def add_unknown(raw: dict[str, Any]) -> None:
        raw["services"]["order"]["methods"]["ShipOrder"] = {"callers": ["edge"]}

    with pytest.raises(ValueError, match=r"does not have in the protos: \['ShipOrder'\]"):
        load(_topology_with(tmp_path, add_unknown))

    def drop_one(raw: dict[str, Any]) -> None:
        del raw["services"]["payment"]["methods"]["RefundPayment"]

    with pytest.raises(
        ValueError, match=r"leaves out RPCs of shop.payment.v1.PaymentService: \['RefundPayment'\]"
    ):
        load(_topology_with(tmp_path, drop_one))
    # ... and rendering fails loudly on it, before writing anything.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shop_mesh.mesh",
            "--topology",
            str(tmp_path / "topology.yaml"),
            "render",
            "--target",
            "k8s",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "RefundPayment" in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_streaming_and_retry_class_come_from_the_descriptors() -> None:
    order = {m.name: m for m in TOPO.services["order"].methods}
    assert order["WatchOrder"].streaming and not order["GetOrder"].streaming
    assert (order["GetOrder"].retry, order["CreateOrder"].retry) == ("read", "idempotent")


def test_the_topology_cannot_switch_retries_on(tmp_path: Path) -> None:
    def upgrade(raw: dict[str, Any]) -> None:
        raw["services"]["user"]["methods"]["DeleteUser"]["retry"] = "read"

    with pytest.raises(ValueError, match="idempotency_level"):
        load(_topology_with(tmp_path, upgrade))

    def streaming_flag(raw: dict[str, Any]) -> None:
        raw["services"]["order"]["methods"]["WatchOrder"]["streaming"] = True

    with pytest.raises(ValueError, match="comes from the protos"):
        load(_topology_with(tmp_path, streaming_flag))


def _user_service_without_option(method: str) -> descriptor.ServiceDescriptor:
    """shop.user.v1.UserService as the protos have it, except that `method` lacks idempotency_level."""
    real = user_pb2.DESCRIPTOR
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if file is real:
            rpc = next(m for m in proto.service[0].method if m.name == method)
            rpc.options.ClearField("idempotency_level")
        pool.Add(proto)

    add(real)
    return pool.FindServiceByName("shop.user.v1.UserService")


def test_a_method_without_idempotency_level_gets_no_retry_policy() -> None:
    fake = _user_service_without_option("GetUser")

    def describe(name: str) -> dict[str, contracts.ContractMethod]:
        return contracts.from_descriptor(fake) if name == fake.full_name else contracts.methods(name)

    topo = load(describe=describe)
    get_user = next(m for m in topo.services["user"].methods if m.name == "GetUser")
    assert get_user.retry == "none"
    # Neither the edge nor order's sidecar retries it; its neighbours keep their policies.
    for config, listener in (
        (render.k8s_edge(topo), "edge"),
        (render.k8s_sidecar(topo, "order"), "outbound_user"),
    ):
        routes = _routes(config, listener)
        assert "retry_policy" not in routes["/shop.user.v1.UserService/GetUser"]
        assert "retry_policy" in routes["/shop.user.v1.UserService/ListUsers"]
    # The same descriptor with the option present: retried (the test above is not vacuous).
    assert "retry_policy" in _routes(render.k8s_edge(TOPO), "edge")["/shop.user.v1.UserService/GetUser"]


def test_unknown_methods_are_answered_unimplemented_by_the_edge() -> None:
    edge = render.k8s_edge(TOPO)
    lst = edge["static_resources"]["listeners"][0]
    routes = lst["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0][
        "routes"
    ]
    by_name = {r["name"]: r for r in routes}
    unknown = by_name["order-unknown"]
    assert unknown["match"]["prefix"] == "/shop.order.v1.OrderService/"
    assert unknown["direct_response"]["status"] == 404  # Envoy: grpc-status 12 for a gRPC request
    # Every known method comes first, so only unknown ones reach the 404; one the edge may not call
    # is still forwarded (the callee's RBAC says PERMISSION_DENIED) and never retried.
    names = [r["name"] for r in routes]
    authorize = "/shop.payment.v1.PaymentService/AuthorizePayment"
    assert names.index(authorize) < names.index("payment-unknown")
    assert by_name[authorize]["route"]["cluster"] == "payment"
    assert "retry_policy" not in by_name[authorize]["route"]


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
    reflection = routes["/grpc.reflection.v1.ServerReflection/*"]
    assert reflection["cluster"] == render.streams_cluster(TOPO.edge_reflection_service)
    assert reflection["timeout"] == "0s"
    assert routes["health-user"]["cluster"] == "user-streams"  # Health/Watch may hold a stream


def test_edge_with_tls_for_clients_validates(tmp_path: Path) -> None:
    from shop_mesh.mesh import local

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
    raw = yaml.safe_load((REPO / "shop_mesh" / "mesh" / "topology.yaml").read_text())
    raw["auth"]["asserters"] = ["edge", "mallory"]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="mallory"):
        load(path)


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_streams_and_unary_calls_have_separate_clusters_and_budgets() -> None:
    up = TOPO.upstream
    edge = render.k8s_edge(TOPO)
    routes = _routes(edge, "edge")
    assert routes["/shop.order.v1.OrderService/WatchOrder"]["cluster"] == "order-streams"
    assert routes["/shop.order.v1.OrderService/GetOrder"]["cluster"] == "order"
    clusters = _clusters(edge)
    unary = clusters["order"]["circuit_breakers"]["thresholds"][0]
    streams = clusters["order-streams"]["circuit_breakers"]["thresholds"][0]
    assert unary["max_requests"] == up.breakers.max_requests
    assert streams["max_requests"] == up.stream_breakers.max_requests
    # Retries are bounded by a budget, not a fixed count.
    assert "max_retries" not in unary
    assert unary["retry_budget"]["budget_percent"]["value"] == up.breakers.retry_budget_percent
    # The sidecar splits the same way, outbound and inbound (to its own app).
    order = render.k8s_sidecar(TOPO, "order")
    assert _routes(order, "outbound_payment")["/shop.payment.v1.PaymentService/WatchPaymentEvents"][
        "cluster"
    ] == ("payment-streams")
    assert {"local_app", "local_app_streams", "payment", "payment-streams"} <= set(_clusters(order))
    lst = next(x for x in order["static_resources"]["listeners"] if x["name"] == "inbound")
    inbound_routes = lst["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    by_path = {r["match"].get("path", r["match"].get("prefix")): r["route"] for r in inbound_routes["routes"]}
    assert by_path["/shop.order.v1.OrderService/WatchOrder"]["cluster"] == "local_app_streams"
    assert by_path["/"]["cluster"] == "local_app"


def test_the_edge_caps_streams_per_client_connection() -> None:
    edge = render.k8s_edge(TOPO)
    hcm = edge["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert (
        hcm["http2_protocol_options"]["max_concurrent_streams"]
        == TOPO.edge_limits.max_concurrent_streams_per_connection
    )


def test_envoy_refusals_are_resource_exhausted_for_grpc_clients() -> None:
    for config in (render.k8s_edge(TOPO), render.k8s_sidecar(TOPO, "payment")):
        for lst in config["static_resources"]["listeners"]:
            if lst["name"] == STATS_LISTENER:  # Prometheus scrapes only: no gRPC traffic
                continue
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            mappers = {
                m["filter"]["response_flag_filter"]["flags"][0]: m["headers_to_add"][0]["header"]
                for m in hcm["local_reply_config"]["mappers"]
                if "response_flag_filter" in m["filter"]  # the edge also maps token failures
            }
            assert mappers["UO"] == {"key": "grpc-status", "value": "8"}  # breaker overflow
            assert mappers["RL"] == {"key": "grpc-status", "value": "8"}  # rate limit


def test_stream_deadlines_are_left_to_the_app() -> None:
    # Envoy enforcing grpc-timeout on a started stream can only reset it (INTERNAL at the client).
    for config, listener in (
        (render.k8s_edge(TOPO), "edge"),
        (render.k8s_sidecar(TOPO, "order"), "outbound_payment"),
    ):
        for name, route in _routes(config, listener).items():
            if route.get("cluster", "").endswith("-streams"):
                assert "max_stream_duration" not in route, name
                assert route["timeout"] == "0s", name


def _h2_options(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Listener or cluster name -> its HTTP/2 protocol options."""
    resources = config["static_resources"]
    options = {
        lst["name"]: lst["filter_chains"][0]["filters"][0]["typed_config"].get("http2_protocol_options", {})
        for lst in resources["listeners"]
        if lst["name"] != STATS_LISTENER
    }
    for cluster in resources["clusters"]:
        http = cluster.get("typed_extension_protocol_options", {})
        for opts in http.values():
            options[cluster["name"]] = opts["explicit_http_config"]["http2_protocol_options"]
    return options


def test_sidecars_serve_with_oghttp2_and_call_upstreams_with_nghttp2() -> None:
    # nghttp2 closes a connection after 1,000 resets it receives (server side only): a sidecar's
    # listeners carry many clients' streams, so they use oghttp2; their upstream connections need not
    # pay its CPU. The edge keeps nghttp2 towards real clients (scripts/h2_reset_flood.py shows both).
    sidecar = render.k8s_sidecar(TOPO, "order")
    assert "layered_runtime" not in sidecar  # no process-wide codec switch
    listeners = {lst["name"] for lst in sidecar["static_resources"]["listeners"]} - {STATS_LISTENER}
    for name, options in _h2_options(sidecar).items():
        assert options.get("use_oghttp2_codec", False) is (name in listeners), name
    for name, options in _h2_options(render.k8s_edge(TOPO)).items():
        assert "use_oghttp2_codec" not in options, name


def test_every_call_is_logged_once_at_the_edge_and_once_per_inbound_sidecar() -> None:
    def log_format(config: dict[str, Any], listener: str) -> str | None:
        lst = next(x for x in config["static_resources"]["listeners"] if x["name"] == listener)
        logs = lst["filter_chains"][0]["filters"][0]["typed_config"].get("access_log", [])
        return logs[0]["typed_config"]["log_format"]["text_format_source"]["inline_string"] if logs else None

    edge_line = log_format(render.k8s_edge(TOPO), "edge")
    assert edge_line is not None and "upstream=%UPSTREAM_HOST%" in edge_line and "attempts=" in edge_line
    sidecar = render.k8s_sidecar(TOPO, "order")
    inbound_line = log_format(sidecar, "inbound")
    # The inbound's upstream is always its own app, reached once: those two fields say nothing there.
    assert inbound_line is not None and "upstream=" not in inbound_line and "attempts=" not in inbound_line
    for field in ("%REQ(:PATH)%", "grpc=%GRPC_STATUS%", "peer=%DOWNSTREAM_PEER_URI_SAN%", "request_id="):
        assert field in inbound_line
    assert log_format(sidecar, "outbound_payment") is None  # the callee's inbound logs that call


def _inbound_unary_limit(config: dict[str, Any]) -> int:
    return int(_clusters(config)["local_app"]["circuit_breakers"]["thresholds"][0]["max_requests"])


def test_the_sidecars_unary_limit_to_its_app_comes_from_the_topology(tmp_path: Path) -> None:
    # The committed topology: order's own limit, the others the mesh-wide unary breaker.
    assert TOPO.services["order"].inbound_max_requests is not None
    assert (
        _inbound_unary_limit(render.k8s_sidecar(TOPO, "order")) == TOPO.services["order"].inbound_max_requests
    )
    assert _inbound_unary_limit(render.k8s_sidecar(TOPO, "user")) == TOPO.upstream.breakers.max_requests
    # Streams keep their own budget whatever the unary limit is.
    streams = _clusters(render.k8s_sidecar(TOPO, "order"))["local_app_streams"]["circuit_breakers"]
    assert streams["thresholds"][0]["max_requests"] == TOPO.upstream.stream_breakers.max_requests

    # A different number in the topology is the number rendered, locally and for Kubernetes.
    def edit(raw: dict[str, Any]) -> None:
        raw["services"]["order"]["inbound_max_requests"] = 7
        raw["services"]["user"]["inbound_max_requests"] = 9

    path = _topology_with(tmp_path, edit)
    topo = load(path)
    assert _inbound_unary_limit(render.k8s_sidecar(topo, "order")) == 7
    assert _inbound_unary_limit(render.k8s_sidecar(topo, "user")) == 9
    assert _inbound_unary_limit(render.k8s_sidecar(topo, "payment")) == topo.upstream.breakers.max_requests
    out = _render(tmp_path, "local", topology=path)
    local_order = next(p for p in bootstraps(out) if "order" in p.name)
    assert _inbound_unary_limit(yaml.safe_load(local_order.read_text())) == 7
    # The edge's per-service breaker is unchanged by it (the limit is per instance, at the sidecar).
    assert (
        _clusters(render.k8s_edge(topo))["order"]["circuit_breakers"]["thresholds"][0]["max_requests"]
        == topo.upstream.breakers.max_requests
    )


def test_the_sidecars_overflow_reply_is_resource_exhausted_naming_its_service() -> None:
    order = render.k8s_sidecar(TOPO, "order")
    lst = next(x for x in order["static_resources"]["listeners"] if x["name"] == "inbound")
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    overflow = next(
        m
        for m in hcm["local_reply_config"]["mappers"]
        if m["filter"]["response_flag_filter"]["flags"] == ["UO"]
    )
    assert overflow["headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "8"}
    assert "order instance" in overflow["body"]["inline_string"]
    # A refused call is never retried into the same overload: no route of the edge retries RESOURCE_EXHAUSTED.
    for name, route in _routes(render.k8s_edge(TOPO), "edge").items():
        retry_on = route.get("retry_policy", {}).get("retry_on", "")
        assert "resource-exhausted" not in retry_on and "retriable-status-codes" not in retry_on, name


@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_inbound_max_requests_must_be_a_positive_integer(tmp_path: Path, value: object) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["services"]["order"]["inbound_max_requests"] = value

    with pytest.raises(ValueError, match="inbound_max_requests"):
        load(_topology_with(tmp_path, edit))


def _filter_names(config: dict[str, Any], listener: str) -> list[str]:
    lst = next(x for x in config["static_resources"]["listeners"] if x["name"] == listener)
    return [f["name"] for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]


def test_per_method_grpc_stats_are_counted_by_the_callers_envoys_not_the_callees_inbound() -> None:
    # The callee's per-method counts are its app's RED metrics (rpc_server_requests_total); the
    # inbound's filter only repeated them at a measurable CPU cost per call.
    grpc_stats = "envoy.filters.http.grpc_stats"
    order = render.k8s_sidecar(TOPO, "order")
    assert grpc_stats not in _filter_names(order, "inbound")
    assert grpc_stats in _filter_names(order, "outbound_user")
    assert grpc_stats in _filter_names(render.k8s_edge(TOPO), "edge")


def test_unused_clusters_check_healthy_hosts_less_often_and_new_hosts_every_interval() -> None:
    up = TOPO.upstream
    assert up.hc_idle_interval_s > up.hc_interval_s
    for config in (render.k8s_edge(TOPO), render.k8s_sidecar(TOPO, "order")):
        for name, cluster in _clusters(config).items():
            for hc in cluster.get("health_checks", []):
                assert hc["interval"] == render.dur(up.hc_interval_s), name
                # A new replica whose first check fails is checked again within a second.
                assert hc["no_traffic_interval"] == render.dur(up.hc_interval_s), name
                assert hc["no_traffic_healthy_interval"] == render.dur(up.hc_idle_interval_s), name

"""The cheapest Envoy hop the machine can do, for `envoy-floor`: two static Envoys in front of one app.

    client --h2c--> minimal edge --mTLS (TLS 1.3, h2)--> minimal sidecar --h2c--> app

Each is an HTTP connection manager with the router and nothing else: one catch-all route, static
clusters, no RBAC, no stats filters, no access log, no health checks, no retries, no request-id
generation. The mTLS between them is the mesh's: the run's own certificates (the edge's and the
service's SPIFFE leaves from the mesh run directory), TLS 1.3 only, ALPN h2, client certificate
required and both peers' URI SANs checked against the CA. Same Envoy binary and flags as the runner
(one worker thread, no hot restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shop_mesh.bench.env import Proc, Stack, free_port

Config = dict[str, Any]
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_H2 = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class Identity:
    cert_dir: Path  # tls.crt, tls.key, ca.crt
    spiffe_id: str


def _common_tls(me: Identity, peer: Identity) -> Config:
    def inline(name: str) -> Config:
        return {"inline_string": (me.cert_dir / name).read_text()}

    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": inline("tls.crt"), "private_key": inline("tls.key")}],
        "validation_context": {
            "trusted_ca": inline("ca.crt"),
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer.spiffe_id}}],
        },
    }


def _hcm(name: str, cluster: str) -> Config:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {
                "name": name,
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": ["*"],
                        # No route timeout: the client's deadline governs, as in the rendered routes.
                        "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}
                        ],
                    }
                ],
            },
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
        },
    }


def _cluster(name: str, port: int, transport_socket: Config | None = None) -> Config:
    cluster: Config = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _H2,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _listener(name: str, port: int, hcm: Config, transport_socket: Config | None = None) -> Config:
    chain: Config = {"filters": [hcm]}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def sidecar_config(listen: int, app_port: int, me: Identity, caller: Identity) -> Config:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS + "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(me, caller),
        },
    }
    return {
        "static_resources": {
            "listeners": [_listener("inbound", listen, _hcm("inbound", "app"), tls)],
            "clusters": [_cluster("app", app_port)],
        }
    }


def edge_config(listen: int, sidecar_port: int, me: Identity, upstream: Identity, sni: str) -> Config:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS + "UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": _common_tls(me, upstream),
        },
    }
    return {
        "static_resources": {
            "listeners": [_listener("edge", listen, _hcm("edge", "upstream"))],
            "clusters": [_cluster("upstream", sidecar_port, tls)],
        }
    }


@dataclass
class MinimalPath:
    edge: str  # 127.0.0.1:port, plaintext h2c
    edge_proc: Proc
    sidecar_proc: Proc


def start(
    stack: Stack, workdir: Path, envoy: str, app: str, service: str, pki: Path, spiffe: dict[str, str]
) -> MinimalPath:
    """Both Envoys in front of `app` (127.0.0.1:port); `pki` holds <identity>/{tls.crt,...}."""
    workdir.mkdir(parents=True, exist_ok=True)
    edge_id = Identity(pki / "edge", spiffe["edge"])
    svc_id = Identity(pki / service, spiffe[service])
    sidecar_port, edge_port = free_port(), free_port()
    configs = {
        "min-sidecar": sidecar_config(sidecar_port, int(app.rsplit(":", 1)[1]), svc_id, edge_id),
        "min-edge": edge_config(edge_port, sidecar_port, edge_id, svc_id, f"{service}.mesh.local"),
    }
    procs: dict[str, Proc] = {}
    for name, config in configs.items():
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)  # it carries a private key
        argv = [envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
        procs[name] = stack.start(name, argv, grace=5)
    return MinimalPath(f"127.0.0.1:{edge_port}", procs["min-edge"], procs["min-sidecar"])

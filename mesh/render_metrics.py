"""Envoy's Prometheus stats on a port a scraper may reach, without the rest of the admin interface.

The admin interface (config dump, /quitquitquit, runtime changes, ...) stays on loopback. A separate
listener (the pattern Istio uses on 15090) routes exactly `/stats/prometheus` to a cluster that is the
admin address, and answers everything else with 404.
"""

from __future__ import annotations

from typing import Any, Protocol

Config = dict[str, Any]

STATS_PATH = "/stats/prometheus"
STATS_LISTENER = "prometheus_stats"
ADMIN_CLUSTER = "envoy_admin"
# The stats port in a pod (Istio's convention), reachable on the pod IP by Prometheus.
K8S_STATS_PORT = 15090


class HostPort(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def _socket(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def stats_listener(host: str, port: int) -> Config:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": STATS_LISTENER,
        "codec_type": "AUTO",
        "route_config": {
            "name": STATS_LISTENER,
            "virtual_hosts": [
                {
                    "name": STATS_LISTENER,
                    "domains": ["*"],
                    "routes": [
                        # `path` matches without the query string: ?usedonly and friends still work.
                        {"match": {"path": STATS_PATH}, "route": {"cluster": ADMIN_CLUSTER}},
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": STATS_LISTENER,
        "address": _socket(host, port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def admin_cluster(admin: Config) -> Config:
    """The Envoy's own admin address as a plain HTTP/1.1 upstream."""
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": admin}}]}],
        },
    }


def with_stats(bootstrap: Config, stats: HostPort | None) -> Config:
    """The bootstrap plus the stats listener on `stats`; unchanged when None."""
    if stats is None:
        return bootstrap
    resources = bootstrap["static_resources"]
    resources["listeners"].append(stats_listener(stats.host, stats.port))
    resources["clusters"].append(admin_cluster(bootstrap["admin"]["address"]))
    return bootstrap

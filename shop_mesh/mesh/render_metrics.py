"""Envoy's Prometheus stats on a port a scraper may reach, without the rest of the admin interface.

The admin interface (config dump, /quitquitquit, runtime changes, ...) stays on loopback. A separate
listener (the pattern Istio uses on 15090) routes exactly `/stats/prometheus` to a cluster that is the
admin address, and answers everything else with 404.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import yaml

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


# --------------------------------------------------------------------------------------------------
# A local Prometheus for `mesh run --prometheus` (the `prometheus` binary, Debian's package)
# --------------------------------------------------------------------------------------------------
RULES_SOURCE = (
    Path(__file__).resolve().parents[2] / "k8s" / "components" / "monitoring" / "prometheus-rules.yaml"
)
SCRAPE_INTERVAL = "5s"


def prometheus_config(directory: Path, rules: Path | None) -> Config:
    """Two jobs fed by file-based discovery (the runner rewrites the target files on every change):
    the apps' /metrics and the Envoys' /stats/prometheus, labelled `service` and `instance` as the
    Kubernetes PodMonitors label them, so the same rules and dashboard queries work locally."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules)] if rules is not None else [],
        "scrape_configs": [
            {
                "job_name": "shop-apps",
                "metrics_path": "/metrics",
                "file_sd_configs": [{"files": [str(directory / "apps.json")], "refresh_interval": "5s"}],
            },
            {
                "job_name": "shop-envoy",
                "metrics_path": STATS_PATH,
                "file_sd_configs": [{"files": [str(directory / "envoy.json")], "refresh_interval": "5s"}],
            },
        ],
    }


def scrape_targets(state: dict[str, Any]) -> dict[str, list[Config]]:
    """{file name: file_sd target groups} from the runner's state."""
    apps: list[Config] = []
    envoys: list[Config] = []
    for inst in state.get("instances", []):
        labels = {"service": inst["service"], "instance": inst["name"]}
        if inst.get("metrics_port"):
            apps.append({"targets": [f"127.0.0.1:{inst['metrics_port']}"], "labels": labels})
        if inst.get("stats_port"):
            envoys.append({"targets": [f"127.0.0.1:{inst['stats_port']}"], "labels": labels})
    if state.get("edge_stats"):
        envoys.append({"targets": [state["edge_stats"]], "labels": {"service": "edge", "instance": "edge"}})
    return {"apps.json": apps, "envoy.json": envoys}


def write_prometheus_files(directory: Path, state: dict[str, Any]) -> Path:
    """prometheus.yml, the alert rules (the PrometheusRule's groups) and the target files; atomic
    writes, so Prometheus never reads half a file. Returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    rules: Path | None = None
    if RULES_SOURCE.exists():
        rules = directory / "rules.yaml"
        _atomic(rules, yaml.safe_dump({"groups": yaml.safe_load(RULES_SOURCE.read_text())["spec"]["groups"]}))
    for name, groups in scrape_targets(state).items():
        _atomic(directory / name, json.dumps(groups, indent=1))
    config = directory / "prometheus.yml"
    _atomic(config, yaml.safe_dump(prometheus_config(directory, rules), sort_keys=False))
    return config


def prometheus_argv(binary: str, directory: Path, port: int) -> list[str]:
    return [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)

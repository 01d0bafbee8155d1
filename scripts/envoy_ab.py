"""Micro A/B of sidecar configurations: Envoy CPU per call, interleaved, ratio of medians.

    h2load --rps --> minimal edge (h2c -> mTLS) --> sidecar variant --> null user app

Every variant gets its own sidecar and its own minimal edge (shop_mesh/bench/minimal_envoy.py) in
front of one null user app; rounds run the variants in turn (order reversed every other round), each
a fixed-rate GetUser for `--seconds`, and read the sidecar's CPU from the scheduler's ns counters
(/proc/<pid>/task/*/schedstat) before and after. Printed: per variant, the median over rounds of CPU
per call and of its ratio to the first variant in the same round.

Variants: `minimal` (the envoy-floor's minimal sidecar), `rendered` (render.sidecar for user-0 as the
local mesh renders it), `<minimal|rendered>-<transform>[+<transform>...]` (with the named transforms
of TRANSFORMS applied, e.g. `rendered-oghttp2+oldlog` = the sidecar before session 6), or
`name=path.yaml` (a bootstrap file; its listener/admin ports are rewritten). h2load sends GetUser
with the `-H` headers (default: the identity headers the edge sets).

`--edge`: the variants are edges instead (`minimal`, `rendered`, `rendered-<transforms>`: the
transforms then act on the edge's listener), each in front of one shared minimal user sidecar that
the rendered edges find by file EDS; the edge's CPU is measured and h2load sends an end-user token.

`--parallel`: every round loads all variants at the same time (one h2load each) instead of one after
the other. On a shared machine this is the steadier comparison: all variants see the same other
load, where a sequence of runs spreads them over tens of seconds of a changing machine (session 7:
per-round ratios within ~±10 % instead of ±25 %). Usage:

    .venv/bin/python scripts/envoy_ab.py minimal rendered rendered-nolog --rounds 6 --seconds 4
    .venv/bin/python scripts/envoy_ab.py --edge --parallel minimal rendered rendered-noauth --rounds 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from shop_mesh.bench import minimal_envoy
from shop_mesh.bench.h2load import grpc_frame
from shop_mesh.mesh import local, render, render_auth, tokens
from shop_mesh.mesh.local import free_port
from shop_mesh.mesh.runner import envoy_binary
from shop_mesh.mesh.topology import EDGE, load

Config = dict[str, Any]
PATH = "/shop.user.v1.UserService/GetUser"


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _inbound_hcm(cfg: Config) -> Config:
    """The HTTP connection manager under test: the sidecar's inbound listener or the edge's."""
    for lis in cfg["static_resources"]["listeners"]:
        if lis["name"] in ("inbound", "edge"):
            hcm: Config = lis["filter_chains"][0]["filters"][0]["typed_config"]
            return hcm
    raise KeyError("inbound")


def _drop_filter(name: str) -> Callable[[Config], None]:
    def f(cfg: Config) -> None:
        hcm = _inbound_hcm(cfg)
        hcm["http_filters"] = [x for x in hcm["http_filters"] if x["name"] != name]

    return f


def _nolog(cfg: Config) -> None:
    _inbound_hcm(cfg).pop("access_log", None)


def _noxfcc(cfg: Config) -> None:
    hcm = _inbound_hcm(cfg)
    hcm.pop("forward_client_cert_details", None)
    hcm.pop("set_current_client_cert_details", None)


def _noreqid(cfg: Config) -> None:
    _inbound_hcm(cfg)["generate_request_id"] = False


def _nostatslistener(cfg: Config) -> None:
    res = cfg["static_resources"]
    res["listeners"] = [x for x in res["listeners"] if x["name"] != "prometheus_stats"]
    res["clusters"] = [x for x in res["clusters"] if x["name"] != "envoy_admin"]


def _nofilters(cfg: Config) -> None:
    hcm = _inbound_hcm(cfg)
    hcm["http_filters"] = [x for x in hcm["http_filters"] if x["name"] == "envoy.filters.http.router"]


def _noroutes(cfg: Config) -> None:
    vh = _inbound_hcm(cfg)["route_config"]["virtual_hosts"][0]
    vh["routes"] = vh["routes"][-1:]


def _nolocalreply(cfg: Config) -> None:
    _inbound_hcm(cfg).pop("local_reply_config", None)


def _noh2opts(cfg: Config) -> None:
    hcm = _inbound_hcm(cfg)
    hcm.pop("http2_protocol_options", None)
    hcm.pop("common_http_protocol_options", None)
    hcm.pop("stream_idle_timeout", None)


def _nooghttp2(cfg: Config) -> None:
    cfg.pop("layered_runtime", None)
    for lis in cfg["static_resources"]["listeners"]:
        h2 = lis["filter_chains"][0]["filters"][0]["typed_config"].get("http2_protocol_options", {})
        h2.pop("use_oghttp2_codec", None)


def _nobreakers(cfg: Config) -> None:
    for c in cfg["static_resources"]["clusters"]:
        c.pop("circuit_breakers", None)


def _nomsd(cfg: Config) -> None:
    for route in _inbound_hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]:
        route.get("route", {}).pop("max_stream_duration", None)


def _nostdout(cfg: Config) -> None:
    """The access log written to /dev/null through the file logger (format cost only)."""
    for log in _inbound_hcm(cfg).get("access_log", []):
        log["name"] = "envoy.access_loggers.file"
        fmt = log["typed_config"]["log_format"]
        log["typed_config"] = {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/null",
            "log_format": fmt,
        }


def _oghttp2(cfg: Config) -> None:
    """oghttp2 for every codec, server and client (the sidecars' runtime flag before session 6)."""
    flag = {"envoy.reloadable_features.http2_use_oghttp2": True}
    cfg["layered_runtime"] = {"layers": [{"name": "static", "static_layer": flag}]}


def _h2split(cfg: Config) -> None:
    """oghttp2 for the server codecs (listeners) only; nghttp2 towards upstreams."""
    cfg.pop("layered_runtime", None)
    for lis in cfg["static_resources"]["listeners"]:
        hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
        if lis["name"] != "prometheus_stats":
            hcm.setdefault("http2_protocol_options", {})["use_oghttp2_codec"] = True


def _onerbac(cfg: Config) -> None:
    """The identity-header DENY folded into the ALLOW policies' principals."""
    hcm = _inbound_hcm(cfg)
    filters = {f["name"]: f for f in hcm["http_filters"]}
    deny = filters["shop.identity_header_rbac"]["typed_config"]["rules"]["policies"]
    (policy,) = deny.values()
    headers = [r["header"]["name"] for r in policy["permissions"][0]["or_rules"]["rules"]]
    asserters = {
        i["authenticated"]["principal_name"]["exact"]
        for i in policy["principals"][0]["not_id"]["or_ids"]["ids"]
    }
    no_headers = [{"not_id": {"header": {"name": h, "present_match": True}}} for h in headers]
    for pol in filters["envoy.filters.http.rbac"]["typed_config"]["rules"]["policies"].values():
        pol["principals"] = [
            p
            if p["authenticated"]["principal_name"]["exact"] in asserters
            else {"and_ids": {"ids": [p, *no_headers]}}
            for p in pol["principals"]
        ]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "shop.identity_header_rbac"]


def _routes(cfg: Config) -> list[Config]:
    return [r for vh in _inbound_hcm(cfg)["route_config"]["virtual_hosts"] for r in vh["routes"]]


def _noretry(cfg: Config) -> None:
    for route in _routes(cfg):
        route.get("route", {}).pop("retry_policy", None)


def _noroutestats(cfg: Config) -> None:
    for route in _routes(cfg):
        route.pop("stat_prefix", None)


def _nohc(cfg: Config) -> None:
    for c in cfg["static_resources"]["clusters"]:
        c.pop("health_checks", None)


def _nooutlier(cfg: Config) -> None:
    for c in cfg["static_resources"]["clusters"]:
        c.pop("outlier_detection", None)


def _noauth(cfg: Config) -> None:
    auth = {
        "envoy.filters.http.header_mutation",
        render_auth.JWT_FILTER,
        "shop.roles_to_header",
        "shop.edge_auth_rbac",
    }
    hcm = _inbound_hcm(cfg)
    hcm["http_filters"] = [x for x in hcm["http_filters"] if x["name"] not in auth]


def _inboundstats(cfg: Config) -> None:
    """The inbound's per-method gRPC stats filter (on the sidecars until session 7)."""
    hcm = _inbound_hcm(cfg)
    hcm["http_filters"].insert(0, render._grpc_stats(list(load().methods_of("user"))))


def _busyhc(cfg: Config) -> None:
    """Healthy hosts of unused clusters checked every interval (before session 7)."""
    for c in cfg["static_resources"]["clusters"]:
        for hc in c.get("health_checks", []):
            hc.pop("no_traffic_healthy_interval", None)


def _logfmt(fmt: str) -> Callable[[Config], None]:
    def f(cfg: Config) -> None:
        for log in _inbound_hcm(cfg).get("access_log", []):
            log["typed_config"]["log_format"] = {"text_format_source": {"inline_string": fmt}}

    return f


def _lognofilter(cfg: Config) -> None:
    for log in _inbound_hcm(cfg).get("access_log", []):
        log.pop("filter", None)


def _nostatstags(cfg: Config) -> None:
    cfg["stats_config"] = {"use_all_default_tags": False}


TRANSFORMS: dict[str, Callable[[Config], None]] = {
    "nolog": _nolog,
    "nostdout": _nostdout,
    "nostats": _drop_filter("envoy.filters.http.grpc_stats"),
    "norbac": _drop_filter("envoy.filters.http.rbac"),
    "noidrbac": _drop_filter("shop.identity_header_rbac"),
    "nofilters": _nofilters,
    "noxfcc": _noxfcc,
    "noreqid": _noreqid,
    "nostatslistener": _nostatslistener,
    "noroutes": _noroutes,
    "nolocalreply": _nolocalreply,
    "noh2opts": _noh2opts,
    "nooghttp2": _nooghttp2,
    "nobreakers": _nobreakers,
    "nomsd": _nomsd,
    "nostatstags": _nostatstags,
    "inboundstats": _inboundstats,
    "busyhc": _busyhc,
    "noretry": _noretry,
    "noroutestats": _noroutestats,
    "nohc": _nohc,
    "nooutlier": _nooutlier,
    "noauth": _noauth,
    "noratelimit": _drop_filter("envoy.filters.http.local_ratelimit"),
    "nostrip": _drop_filter("envoy.filters.http.header_mutation"),
    "noroles": _drop_filter("shop.roles_to_header"),
    "noedgerbac": _drop_filter("shop.edge_auth_rbac"),
    "oghttp2": _oghttp2,
    "oldlog": _logfmt(render.EDGE_LOG_FORMAT),
    "h2split": _h2split,
    "onerbac": _onerbac,
    "lognofilter": _lognofilter,
    "logmin": _logfmt("%REQ(:PATH)% %RESPONSE_CODE%\n"),
    "lognosan": _logfmt(
        "%REQ(:PATH)% %RESPONSE_CODE% grpc=%GRPC_STATUS% flags=%RESPONSE_FLAGS% %DURATION%ms "
        "upstream=%UPSTREAM_HOST% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% request_id=%REQ(X-REQUEST-ID)%\n"
    ),
    "lognoup": _logfmt(
        "%REQ(:PATH)% %RESPONSE_CODE% grpc=%GRPC_STATUS% flags=%RESPONSE_FLAGS% %DURATION%ms "
        "peer=%DOWNSTREAM_PEER_URI_SAN% request_id=%REQ(X-REQUEST-ID)%\n"
    ),
    "loggrpcnum": _logfmt(
        "%REQ(:PATH)% %RESPONSE_CODE% grpc=%GRPC_STATUS_NUMBER% flags=%RESPONSE_FLAGS% %DURATION%ms "
        "upstream=%UPSTREAM_HOST% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% "
        "peer=%DOWNSTREAM_PEER_URI_SAN% request_id=%REQ(X-REQUEST-ID)%\n"
    ),
}


class Harness:
    def __init__(self, work: Path, rate: int, seconds: float, extra_headers: list[str]):
        self.work = work
        self.rate = rate
        self.seconds = seconds
        self.headers = extra_headers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.topo = load()
        self.run = local.RunDir(work / "run")
        self.run.make()
        local.prepare_pki(self.topo, self.run)
        self.envoy = envoy_binary()
        self.body = work / "req.bin"
        self.body.write_bytes(grpc_frame(b"\x0a\x05user1"))

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def app(self) -> int:
        port = free_port()
        env = {**os.environ, "NULL_SERVICE": "user", "PORT": str(port)}
        self.start("app", [sys.executable, "-m", "shop_mesh.bench.null_app"], env)
        return port

    def sidecar_config(self, variant: str, listen: int, app_port: int) -> Config:
        cfg: Config
        pki = self.run.pki
        me = minimal_envoy.Identity(pki / "user", self.topo.spiffe_id("user"))
        caller = minimal_envoy.Identity(pki / EDGE, self.topo.spiffe_id(EDGE))
        base, _, transforms = variant.partition("-")
        if base == "minimal":
            cfg = minimal_envoy.sidecar_config(listen, app_port, me, caller)
            for t in filter(None, transforms.split("+")):
                TRANSFORMS[t](cfg)
            return cfg
        if "=" in variant:
            cfg = yaml.safe_load(Path(variant.split("=", 1)[1]).read_text())
            _inbound_listener(cfg)["address"]["socket_address"]["port_value"] = listen
            _retarget_app(cfg, app_port)
            cfg["admin"]["address"]["socket_address"]["port_value"] = free_port()
            for lis in cfg["static_resources"]["listeners"]:
                if lis["name"] == "prometheus_stats":
                    lis["address"]["socket_address"]["port_value"] = free_port()
            for c in cfg["static_resources"]["clusters"]:
                if c["name"] == "envoy_admin":
                    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = cfg[
                        "admin"
                    ]["address"]
            return cfg
        assert base == "rendered", variant
        inst = local.Instance(
            "user", 0, app_port, listen, free_port(), {}, metrics_port=0, stats_port=free_port()
        )
        cfg = copy.deepcopy(render.sidecar(self.topo, local.sidecar_plan(self.run, inst)))
        for t in filter(None, transforms.split("+")):
            TRANSFORMS[t](cfg)
        return cfg

    def edge_config(self, variant: str, listen: int, sidecar_port: int) -> Config:
        """An edge variant in front of the shared minimal user sidecar (`--edge`)."""
        pki = self.run.pki
        me = minimal_envoy.Identity(pki / EDGE, self.topo.spiffe_id(EDGE))
        svc = minimal_envoy.Identity(pki / "user", self.topo.spiffe_id("user"))
        base, _, transforms = variant.partition("-")
        cfg: Config
        if base == "minimal":
            cfg = minimal_envoy.edge_config(listen, sidecar_port, me, svc, "user.mesh.local")
        else:
            assert base == "rendered", variant
            cfg = copy.deepcopy(render.edge(self.topo, local.edge_plan(self.run, listen, free_port())))
        for t in filter(None, transforms.split("+")):
            TRANSFORMS[t](cfg)
        return cfg

    def envoy_proc(self, name: str, cfg: Config) -> subprocess.Popen[bytes]:
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [self.envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
        return self.start(name, argv)

    def h2load(self, port: int, seconds: float) -> int:
        cmd = [
            "h2load", "-c", "1", "-m", "4", f"--rps={self.rate}", "-D", f"{max(1, round(seconds))}",
            "-d", str(self.body), "-H", "content-type: application/grpc", "-H", "te: trailers",
        ]  # fmt: skip
        for h in self.headers:
            cmd += ["-H", h]
        cmd.append(f"http://127.0.0.1:{port}{PATH}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        if not m:
            raise RuntimeError(out)
        return int(m.group(2))


def _inbound_listener(cfg: Config) -> Config:
    return next(x for x in cfg["static_resources"]["listeners"] if x["name"] == "inbound")


def _retarget_app(cfg: Config, app_port: int) -> None:
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] in (render.LOCAL_APP_CLUSTER, render.LOCAL_APP_STREAMS):
            ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = app_port


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="print the work dir and keep it")
    ap.add_argument("-H", dest="headers", action="append", default=[], help="extra request header")
    ap.add_argument(
        "--edge",
        action="store_true",
        help="variants are edges (minimal or rendered) in front of one minimal user sidecar; "
        "the edge's CPU is measured and h2load sends an end-user token",
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="load every variant at the same time in each round (same machine state for all) "
        "instead of one after the other",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="envoy-ab-"))
    h = Harness(
        work, args.rate, args.seconds, args.headers or ["x-shop-user-id: u1", "x-shop-roles: customer"]
    )
    pids: dict[str, tuple[int, int]] = {}
    try:
        app_port = h.app()
        pki = h.run.pki
        edge_id = minimal_envoy.Identity(pki / EDGE, h.topo.spiffe_id(EDGE))
        svc_id = minimal_envoy.Identity(pki / "user", h.topo.spiffe_id("user"))
        if args.edge:
            h.headers = args.headers or [
                f"authorization: Bearer {tokens.mint(h.run.jwt, h.topo.auth.local, 'u1', ['customer'])}"
            ]
            sc_port = free_port()
            h.envoy_proc("sc", minimal_envoy.sidecar_config(sc_port, app_port, svc_id, edge_id))
            # The rendered edges find the sidecar by file EDS, as in the local mesh; the other services
            # have no endpoint (their clusters exist, no health checks go out for them).
            for name in h.topo.services:
                eps = [("user-0", render.Address("127.0.0.1", sc_port), False)] if name == "user" else []
                local.write_eds(h.run, name, eps)
            for i, v in enumerate(args.variants):
                edge_port = free_port()
                pids[v] = (h.envoy_proc(f"edge{i}", h.edge_config(v, edge_port, sc_port)).pid, edge_port)
        for i, v in enumerate([] if args.edge else args.variants):
            sc_port, edge_port = free_port(), free_port()
            sc = h.envoy_proc(f"sc{i}", h.sidecar_config(v, sc_port, app_port))
            h.envoy_proc(
                f"edge{i}", minimal_envoy.edge_config(edge_port, sc_port, edge_id, svc_id, "user.mesh.local")
            )
            pids[v] = (sc.pid, edge_port)
        time.sleep(2.0)
        for _, port in pids.values():  # warm: connections, TLS, first-use allocations
            h.h2load(port, 1)
        cpu: dict[str, list[float]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            if args.parallel:
                # All variants at once: each sees the same machine, which a sequence of runs does not.
                before = {v: cpu_ns(pids[v][0]) for v in args.variants}
                with ThreadPoolExecutor(len(args.variants)) as pool:
                    done = dict(
                        zip(
                            args.variants,
                            pool.map(lambda v: h.h2load(pids[v][1], args.seconds), args.variants),
                            strict=True,
                        )
                    )
                for v in args.variants:
                    cpu[v].append((cpu_ns(pids[v][0]) - before[v]) / 1e3 / max(done[v], 1))
            order = [] if args.parallel else args.variants if r % 2 == 0 else list(reversed(args.variants))
            for v in order:
                pid, port = pids[v]
                start = cpu_ns(pid)
                calls = h.h2load(port, args.seconds)
                cpu[v].append((cpu_ns(pid) - start) / 1e3 / max(calls, 1))
            print(f"round {r + 1}: " + "  ".join(f"{v} {cpu[v][-1]:.0f}" for v in args.variants), flush=True)
        ref = args.variants[0]
        print(
            f"\n{'edge' if args.edge else 'sidecar'} CPU µs per call, medians of {args.rounds} rounds "
            f"(ratio: to {ref} in the same round)"
        )
        for v in args.variants:
            ratios = [a / b for a, b in zip(cpu[v], cpu[ref], strict=True)]
            print(
                f"  {v:40s} {statistics.median(cpu[v]):6.0f} µs   "
                f"x{statistics.median(cpu[v]) / statistics.median(cpu[ref]):.3f} (ratio of medians)   "
                f"per-round median x{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            )
    finally:
        h.stop()
        if args.keep:
            print(f"work dir: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

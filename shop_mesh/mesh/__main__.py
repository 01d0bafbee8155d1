"""`python -m shop_mesh.mesh`: render, validate, run, status, scale, restart, rotate-certs, token.

Environment defaults (so `make run` needs no arguments): MESH_RUN_DIR (.run), MESH_EDGE_PORT
(topology edge.port), MESH_EDGE_ADMIN_PORT (topology edge.admin_port; 0 = any free port),
MESH_REPLICAS ("order=2,payment=2").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

from shop_mesh.mesh import local, render
from shop_mesh.mesh.local import Instance, RunDir
from shop_mesh.mesh.topology import TOPOLOGY_PATH, Topology, load


def _replicas(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            name, _, count = item.partition("=")
            out[name] = int(count)
    return out


def _env(values: list[str]) -> dict[str, dict[str, str]]:
    """`KEY=VAL` (every app), `order:KEY=VAL` (a service) or `order-1:KEY=VAL` (one instance)."""
    out: dict[str, dict[str, str]] = {}
    for value in values:
        target, _, assignment = value.rpartition(":") if ":" in value.split("=", 1)[0] else ("", "", value)
        key, _, val = assignment.partition("=")
        out.setdefault(target, {})[key] = val
    return out


def _run_dir(args: argparse.Namespace) -> RunDir:
    return RunDir(Path(args.run_dir or os.environ.get("MESH_RUN_DIR", ".run")).resolve())


def cmd_render(topo: Topology, args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.target == "k8s":
        for path in render.render_k8s(topo, out):
            print(path)
        return 0
    # local: the layout `mesh run` uses (one instance per replica, free ports), without starting it.
    run = RunDir(out.resolve())
    run.make()
    local.prepare_pki(topo, run)
    for name, svc in topo.services.items():
        instances = [Instance.allocate(topo, name, i) for i in range(svc.replicas)]
        for inst in instances:
            path = run.envoy / f"{inst.name}.yaml"
            render.write_yaml(path, render.sidecar(topo, local.sidecar_plan(run, inst)))
            print(path)
        local.write_eds(run, name, [(i.name, i.inbound, False) for i in instances])
    edge_path = run.envoy / "edge.yaml"
    render.write_yaml(
        edge_path, render.edge(topo, local.edge_plan(run, topo.edge_port, topo.edge_admin_port))
    )
    print(edge_path)
    return 0


def cmd_validate(topo: Topology, args: argparse.Namespace) -> int:
    from shop_mesh.mesh.validate import bootstraps, validate_file

    paths = [p for arg in args.paths for p in (bootstraps(Path(arg)) if Path(arg).is_dir() else [Path(arg)])]
    failed = 0
    for path in paths:
        result = validate_file(path, topo)
        print(f"{'OK  ' if result.ok else 'FAIL'} {path}")
        if not result.ok:
            failed += 1
            print(result.output[-3000:], file=sys.stderr)
    return 1 if failed or not paths else 0


def cmd_run(topo: Topology, args: argparse.Namespace) -> int:
    from shop_mesh.mesh.runner import MeshOptions, run_mesh

    edge_port = (
        args.edge_port
        if args.edge_port is not None
        else int(os.environ.get("MESH_EDGE_PORT", topo.edge_port))
    )
    admin = args.edge_admin_port
    if admin is None:
        admin = int(os.environ.get("MESH_EDGE_ADMIN_PORT", topo.edge_admin_port))
    opts = MeshOptions(
        run_dir=_run_dir(args).root,
        edge_port=edge_port,
        edge_admin_port=admin,
        replicas=_replicas([os.environ.get("MESH_REPLICAS", ""), *args.replicas]),
        env=_env(args.env),
        echo=not args.quiet,
        edge_tls=args.edge_tls or os.environ.get("MESH_EDGE_TLS", "") in ("1", "true"),
        prometheus=args.prometheus,
    )
    return asyncio.run(run_mesh(topo, opts))


def cmd_status(topo: Topology, args: argparse.Namespace) -> int:
    from shop_mesh.mesh.runner import collect_status, format_status

    try:
        state = asyncio.run(collect_status(topo, _run_dir(args)))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if args.json else format_status(state))
    return 0


def _control(args: argparse.Namespace, request: dict[str, object]) -> int:
    from shop_mesh.mesh.runner import control_request

    try:
        result = asyncio.run(control_request(_run_dir(args), request))
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def cmd_rotate(topo: Topology, args: argparse.Namespace) -> int:
    run = _run_dir(args)
    if run.control.exists():
        return _control(args, {"command": "rotate-certs"})
    # No runner: the files are all there is; a later `mesh run` picks them up.
    print(json.dumps({"renewed": local.prepare_pki(topo, run, force=True)}))
    return 0


def cmd_token(topo: Topology, args: argparse.Namespace) -> int:
    """Print a dev end-user JWT signed with the run dir's key (created on first use)."""
    from shop_mesh.mesh import tokens

    if not args.admin and not args.user:
        print("error: give --user usr_... (a customer) or --admin", file=sys.stderr)
        return 2
    roles = [topo.auth.admin_role] if args.admin else ["customer"]
    subject = args.user or "admin"
    ttl = tokens.parse_ttl(args.ttl)
    print(tokens.mint(_run_dir(args).jwt, topo.auth.local, subject, roles, ttl))
    return 0


def cmd_top(topo: Topology, args: argparse.Namespace) -> int:
    from shop_mesh.mesh.top import run_top

    return run_top(_run_dir(args), interval=args.interval, iterations=args.iterations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shop_mesh.mesh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--topology", default=str(TOPOLOGY_PATH), help="topology file (default: shop_mesh/mesh/topology.yaml)"
    )
    parser.add_argument("--run-dir", default=None, help="runtime directory (default: $MESH_RUN_DIR or .run)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="write Envoy configs rendered from the topology")
    p.add_argument("--target", choices=["local", "k8s"], default="local")
    p.add_argument("--out", required=True)

    p = sub.add_parser("validate", help="envoy --mode validate on rendered bootstraps (files or dirs)")
    p.add_argument("paths", nargs="+")

    p = sub.add_parser("run", help="run the whole mesh locally until Ctrl-C")
    p.add_argument("--edge-port", type=int, default=None)
    p.add_argument("--edge-admin-port", type=int, default=None, help="0 = any free port")
    p.add_argument("--replicas", action="append", default=[], metavar="SERVICE=N")
    p.add_argument("--env", action="append", default=[], metavar="[TARGET:]KEY=VALUE")
    p.add_argument("--quiet", action="store_true", help="log to .run/logs only, do not echo")
    p.add_argument(
        "--edge-rate-limit",
        type=int,
        default=None,
        metavar="RPS",
        help="override the topology's edge rate limit for this run (benchmarks measure past it)",
    )
    p.add_argument(
        "--edge-tls", action="store_true", help="TLS (dev CA) instead of plaintext h2c at the edge"
    )

    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a local Prometheus (the `prometheus` binary) scraping every app and proxy",
    )

    p = sub.add_parser(
        "status", help="each process: supervision state, restarts, last exit, health, endpoint health"
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "scale", help="set the replica count of a service; returns once every caller routes accordingly"
    )
    p.add_argument("service")
    p.add_argument("replicas", type=int)

    p = sub.add_parser(
        "restart",
        help="rolling restart of one instance (app drains, then its sidecar); returns once every caller "
        "routes to it again",
    )
    p.add_argument("instance")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("rotate-certs", help="issue new leaf certificates now (Envoy reloads them live)")

    p = sub.add_parser(
        "token", help="print a dev end-user JWT for the local edge (-H 'authorization: Bearer …')"
    )
    p.add_argument("--user", default=None, metavar="USER_ID", help="a customer: sub = this user id")
    p.add_argument("--admin", action="store_true", help="an operator (role admin; sub = --user or 'admin')")
    p.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d (default 1h)")

    p = sub.add_parser("top", help="live RPS, success rate, latency, streams and the saga per instance")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many frames")
    p.set_defaults(handler=cmd_top)

    args = parser.parse_args(argv)
    topo = load(Path(args.topology))
    if args.command == "render":
        return cmd_render(topo, args)
    if args.command == "validate":
        return cmd_validate(topo, args)
    if args.command == "run":
        if args.edge_rate_limit is not None:
            # Only this run's rendered edge changes; the topology file stays the source of truth.
            limit = {
                **topo.edge_rate_limit,
                "max_tokens": args.edge_rate_limit,
                "tokens_per_fill": args.edge_rate_limit,
            }
            topo = dataclasses.replace(topo, edge_rate_limit=limit)
        return cmd_run(topo, args)
    if args.command == "status":
        return cmd_status(topo, args)
    if args.command == "scale":
        return _control(args, {"command": "scale", "service": args.service, "replicas": args.replicas})
    if args.command == "restart":
        env = dict(item.partition("=")[::2] for item in args.env)
        return _control(args, {"command": "restart", "instance": args.instance, "env": env})
    if args.command == "rotate-certs":
        return cmd_rotate(topo, args)
    if args.command == "token":
        return cmd_token(topo, args)
    if hasattr(args, "handler"):
        return int(args.handler(topo, args))
    return 2


if __name__ == "__main__":
    sys.exit(main())

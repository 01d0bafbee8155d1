"""What several scenarios share: the max-throughput sweep and the deployment under test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Proc, Unavailable, start_service
from shop_mesh.bench.loadgen import LoadSpec
from shop_mesh.bench.mesh import MeshRun, start_mesh
from shop_mesh.bench.postgres import create_databases, drop_databases
from shop_mesh.bench.report import Figure, RunSummary
from shop_mesh.bench.seed import seed_users_db, seed_users_grpc


def ok_rps(run: RunSummary) -> float:
    return run.ok / run.duration_s if run.duration_s else 0.0


def max_throughput(
    ctx: RunContext, label: str, make_spec: Callable[[int], LoadSpec], watch: dict[str, int]
) -> tuple[RunSummary, list[RunSummary]]:
    """Closed-loop sweep over the configured concurrency levels; the best OK-RPS is the maximum."""
    runs = [ctx.measure(f"{label} c={c}", make_spec(c), watch) for c in ctx.options.concurrency]
    best = max(runs, key=ok_rps)
    return best, runs


def empty_reason(run: RunSummary) -> str:
    """Why a run cannot give a figure ('' if it can): no call completed in its window, or none
    succeeded (e.g. all UNAUTHENTICATED: the latencies of refusals measure nothing). The report adds
    a FAIL row for such a run (report.failed_runs)."""
    if run.ok > 0:
        return ""
    if run.count > 0:
        return "no call succeeded (" + ", ".join(f"{k} {v:,}" for k, v in run.errors.items()) + ")"
    return "; ".join(run.problems) or "no call completed in the measurement window"


def ratio(value: float | None, ctx: RunContext) -> float | None:
    return value / ctx.limit if value is not None and ctx.limit else None


def rps_figure(
    scenario: str, name: str, value: float | None, factor: float, ctx: RunContext, note: str = ""
) -> Figure:
    """A throughput figure with the target `>= factor x L`."""
    return Figure(
        scenario,
        name,
        value,
        "RPS",
        f"≥ {factor:g} x L",
        target_value=factor * ctx.limit if ctx.limit else None,
        compare=">=",
        ratio_to_l=ratio(value, ctx),
        note=note or ("" if ctx.limit else "L not measured"),
    )


Variant = Literal["sqlite", "postgres"]


@dataclass
class Deployment:
    """The services under test. `direct` are the apps' own plaintext ports; `edge` is the mesh entry
    (None without a mesh, with `mesh_unavailable` saying why)."""

    direct: dict[str, str]
    edge: str | None
    pids: dict[str, int]
    user_ids: list[str] = field(default_factory=list)
    hops: int = 2  # proxies between the client and an app through the edge: edge + app's sidecar
    mesh_unavailable: str = ""
    mesh: MeshRun | None = None
    variant: Variant = "sqlite"
    procs: list[Proc] = field(default_factory=list)  # what to stop when the deployment is released
    cleanup: Callable[[], None] | None = None  # e.g. drop the PostgreSQL databases

    def auth(self, target: str | None) -> tuple[tuple[str, str], ...]:
        """Call metadata for `target`: the bearer token when it is the edge, nothing for an app."""
        if target is None or target != self.edge or self.mesh is None or not self.mesh.token:
            return ()
        return (("authorization", f"Bearer {self.mesh.token}"),)

    def app_pids(self) -> dict[str, int]:
        return {k: v for k, v in self.pids.items() if k in ("user", "order", "payment")}


def _key(variant: Variant) -> str:
    return "deployment" if variant == "sqlite" else f"deployment-{variant}"


def deployment(ctx: RunContext, variant: Variant = "sqlite") -> Deployment:
    """The run's deployment of a variant, started on first use and shared by the service scenarios.

    With the mesh runnable: `python -m shop_mesh.mesh run` (its own ports and run directory); direct figures
    then hit the very app processes the mesh figures go through. Without it: the three services
    started directly (order wired straight to user and payment), and every mesh figure reports
    'unavailable: <why>'. `postgres` puts every service on its own database of the local PostgreSQL
    (created here, dropped on release). One deployment runs at a time: starting one variant stops
    the other, so neither measures with the other's idle processes on the machine.
    """
    key = _key(variant)
    cached = ctx.shared.get(key)
    if isinstance(cached, Deployment):
        return cached
    failure = ctx.shared.get(f"{key}-error")
    if isinstance(failure, Unavailable):
        raise failure
    for other in ("sqlite", "postgres"):
        if other != variant:
            release_deployment(ctx, other)
    try:
        dep = _start(ctx, variant)
    except Unavailable as exc:
        ctx.shared[f"{key}-error"] = exc
        raise
    ctx.shared[key] = dep
    return dep


def _start(ctx: RunContext, variant: Variant) -> Deployment:
    n_users = ctx.options.scaled(ctx.options.users, 200)
    data = ctx.workdir / f"data-{variant}"
    env = _service_env()
    urls: dict[str, str] = {}
    cleanup: Callable[[], None] | None = None
    if variant == "postgres":
        urls, names = create_databases()

        def cleanup() -> None:
            drop_databases(names)

        ctx.stack.cleanups.append(cleanup)
        for service, url in urls.items():
            env[f"{service.upper()}_DATABASE_URL"] = url
        ctx.console.print(f"PostgreSQL databases: {', '.join(names)}")
    mesh_reason = ""
    try:
        mesh = start_mesh(ctx.stack, ctx.workdir / f"mesh-{variant}", env=env)
    except Unavailable as exc:
        mesh_reason = str(exc)
        mesh = None
    except BaseException:
        _drop(ctx, cleanup)
        raise
    if mesh is not None:
        user_db = urls.get("user") or mesh.user_database_url
        ids = seed_users_db(user_db, n_users) if user_db else seed_users_grpc(mesh.direct["user"], n_users)
        ctx.console.print(
            f"mesh up ({variant}): edge {mesh.edge}, apps {mesh.direct}; seeded {len(ids):,} users"
        )
        return Deployment(
            direct=dict(mesh.direct),
            edge=mesh.edge,
            pids=dict(mesh.pids),
            user_ids=ids,
            mesh=mesh,
            variant=variant,
            procs=[mesh.proc],
            cleanup=cleanup,
        )
    ctx.console.print(f"[yellow]mesh unavailable ({mesh_reason}); starting the services directly[/yellow]")
    user_db = urls.get("user") or f"sqlite:///{(data / 'user.db').resolve()}"
    data.mkdir(parents=True, exist_ok=True)
    ids = seed_users_db(user_db, n_users)
    user, user_port = start_service(ctx.stack, "user", data, env)
    payment, pay_port = start_service(ctx.stack, "payment", data, env)
    order, order_port = start_service(
        ctx.stack,
        "order",
        data,
        {
            **env,
            "USER_SERVICE_ADDR": f"127.0.0.1:{user_port}",
            "PAYMENT_SERVICE_ADDR": f"127.0.0.1:{pay_port}",
        },
    )
    ctx.console.print(f"services up (no mesh): user {user_port}, order {order_port}, payment {pay_port}")
    return Deployment(
        direct={
            "user": f"127.0.0.1:{user_port}",
            "order": f"127.0.0.1:{order_port}",
            "payment": f"127.0.0.1:{pay_port}",
        },
        edge=None,
        pids={"user": user.pid, "order": order.pid, "payment": payment.pid},
        user_ids=ids,
        mesh_unavailable=mesh_reason,
        variant=variant,
        procs=[user, payment, order],
        cleanup=cleanup,
    )


def _service_env() -> dict[str, str]:
    # Settlement 60 s after capture, so the order watch-fanout watches stays open however long its
    # 1,000 streams take to open (it triggers the status change itself, with CancelOrder). The
    # asynchronous settlement of create-order's orders therefore falls outside its windows.
    env = {"SETTLEMENT_DELAY_SECONDS": "60", "GRACE_PERIOD_SECONDS": "2"}
    if os.environ.get("BENCH_METRICS_OFF"):  # the before/after of docs/performance.md's metrics cost
        env["METRICS_PORT"] = "0"
    return env


def _drop(ctx: RunContext, cleanup: Callable[[], None] | None) -> None:
    if cleanup is None:
        return
    if cleanup in ctx.stack.cleanups:
        ctx.stack.cleanups.remove(cleanup)
    with contextlib.suppress(Exception):
        cleanup()


def release_deployment(ctx: RunContext, variant: Variant | None = None) -> None:
    """Stop a variant's deployment, or (None) every one and the rest of the stack (e.g. before
    `startup`, which needs a quiet machine)."""
    for v in ("sqlite", "postgres") if variant is None else (variant,):
        dep = ctx.shared.pop(_key(v), None)
        if not isinstance(dep, Deployment):
            continue
        for proc in reversed(dep.procs):
            ctx.stack.release(proc)
        _drop(ctx, dep.cleanup)
    if variant is None:
        ctx.stack.close()

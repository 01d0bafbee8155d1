"""What several scenarios share: the max-throughput sweep and the deployment under test."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.context import RunContext
from bench.env import Unavailable, start_service
from bench.loadgen import LoadSpec
from bench.mesh import MeshRun, start_mesh
from bench.report import Figure, RunSummary
from bench.seed import seed_users_db, seed_users_grpc


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
    """Why a run cannot give a figure ('' if it can): no call completed in its window."""
    if run.count > 0:
        return ""
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

    def app_pids(self) -> dict[str, int]:
        return {k: v for k, v in self.pids.items() if k in ("user", "order", "payment")}


def deployment(ctx: RunContext) -> Deployment:
    """The run's one deployment, started on first use and shared by the service scenarios.

    With the mesh runnable: `python -m mesh run` (its own ports and run directory); direct figures
    then hit the very app processes the mesh figures go through. Without it: the three services
    started directly (order wired straight to user and payment), and every mesh figure reports
    'unavailable: <why>'.
    """
    cached = ctx.shared.get("deployment")
    if isinstance(cached, Deployment):
        return cached
    failure = ctx.shared.get("deployment_error")
    if isinstance(failure, Unavailable):
        raise failure
    try:
        dep = _start(ctx)
    except Unavailable as exc:
        ctx.shared["deployment_error"] = exc
        raise
    ctx.shared["deployment"] = dep
    return dep


def _start(ctx: RunContext) -> Deployment:
    n_users = ctx.options.scaled(ctx.options.users, 200)
    data = ctx.workdir / "data"
    mesh_reason = ""
    try:
        mesh = start_mesh(ctx.stack, ctx.workdir / "mesh", env=_service_env())
    except Unavailable as exc:
        mesh_reason = str(exc)
        mesh = None
    if mesh is not None:
        ids: list[str]
        if mesh.user_database_url:
            ids = seed_users_db(mesh.user_database_url, n_users)
        else:
            ids = seed_users_grpc(mesh.direct["user"], n_users)
        ctx.console.print(f"mesh up: edge {mesh.edge}, apps {mesh.direct}; seeded {len(ids):,} users")
        return Deployment(
            direct=dict(mesh.direct), edge=mesh.edge, pids=dict(mesh.pids), user_ids=ids, mesh=mesh
        )
    ctx.console.print(f"[yellow]mesh unavailable ({mesh_reason}); starting the services directly[/yellow]")
    user_db = f"sqlite+aiosqlite:///{(data / 'user.db').resolve()}"
    ids = seed_users_db(user_db, n_users)
    user, user_port = start_service(ctx.stack, "user", data, _service_env())
    payment, pay_port = start_service(ctx.stack, "payment", data, _service_env())
    order, order_port = start_service(
        ctx.stack,
        "order",
        data,
        {
            **_service_env(),
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
    )


def _service_env() -> dict[str, str]:
    # Settlement 60 s after capture, so the order watch-fanout watches stays open however long its
    # 1,000 streams take to open (it triggers the status change itself, with CancelOrder). The
    # asynchronous settlement of create-order's orders therefore falls outside its windows.
    env = {"SETTLEMENT_DELAY_SECONDS": "60", "GRACE_PERIOD_SECONDS": "2"}
    if os.environ.get("BENCH_METRICS_OFF"):  # the before/after of docs/performance.md's metrics cost
        env["METRICS_PORT"] = "0"
    return env


def release_deployment(ctx: RunContext) -> None:
    """Stop the shared deployment (e.g. before `startup`, which needs a quiet machine)."""
    dep = ctx.shared.pop("deployment", None)
    if not isinstance(dep, Deployment):
        return
    if dep.mesh is not None:
        ctx.stack.stop(dep.mesh.proc)
        if dep.mesh.proc in ctx.stack.procs:
            ctx.stack.procs.remove(dep.mesh.proc)
    ctx.stack.close()

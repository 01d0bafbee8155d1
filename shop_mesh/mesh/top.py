"""`python -m shop_mesh.mesh top`: a live view of the running local mesh, like `linkerd viz stat`/`top`.

Every second it scrapes each app's Prometheus endpoint and each sidecar's (and the edge's)
/stats/prometheus — the addresses come from the run dir's state.json — and shows per instance:
RPS, success rate, p50/p99 latency and open streams as the app sees them, RPS and p99 as its sidecar
sees them (inbound, mTLS included), and the saga: orders per second by outcome, waiting for settlement.

Rates are differences between two scrapes; quantiles are interpolated in the difference of two
histograms, as Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import math
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from shop_mesh.mesh.local import RunDir, read_state

# gRPC codes that mean the server failed; the others (OK, NOT_FOUND, INVALID_ARGUMENT, ...) are
# answers, as in the server spans (shop_mesh/services/common/interceptors.py).
SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
INBOUND = "inbound"
# Envoy's p99 is taken over at least this long: its exposed histograms change at stats flushes (5 s).
ENVOY_WINDOW_S = 10.0

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """{sample name: [(labels, value)]} from the Prometheus text format."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def fetch(url: str, timeout: float = 2.0) -> Samples | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return parse(resp.read().decode())
    except (OSError, ValueError):
        return None


def total(samples: Samples, name: str, match: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
    return sum(v for labels, v in samples.get(name, ()) if match(labels))


def buckets(samples: Samples, name: str, match: Callable[[dict[str, str]], bool]) -> dict[float, float]:
    """Cumulative bucket counts by upper bound, summed over the matching series."""
    out: dict[float, float] = defaultdict(float)
    for labels, v in samples.get(f"{name}_bucket", ()):
        if match(labels):
            out[float(labels["le"])] += v
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """histogram_quantile over the increase between two scrapes; None without observations."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus does
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 0.0)
        lower, below = bound, count
    return lower


@dataclass
class Target:
    """One process to scrape: an app (kind "app") or an Envoy (kind "sidecar" / "edge")."""

    instance: str
    service: str
    kind: str
    url: str


@dataclass
class Row:
    instance: str
    service: str
    rps: float | None = None
    success: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    streams: float | None = None
    mesh_rps: float | None = None
    mesh_p99_ms: float | None = None


@dataclass
class Saga:
    per_second: dict[str, float] = field(default_factory=dict)
    awaiting: float | None = None
    oldest_s: float | None = None
    stuck: float | None = None


# Only the two series top reads: a full Envoy scrape is thousands of lines whose parsing cost a loaded
# 2-core machine seconds per frame (Envoy filters by stat name, e.g. http.inbound.downstream_rq_time).
ENVOY_QUERY = "?usedonly&filter=" + urllib.parse.quote(r"\.downstream_rq_(total|time)$")


def targets(state: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    for inst in state.get("instances", []):
        if inst.get("metrics_port"):
            out.append(
                Target(
                    inst["name"], inst["service"], "app", f"http://127.0.0.1:{inst['metrics_port']}/metrics"
                )
            )
        if inst.get("stats_port"):
            url = f"http://127.0.0.1:{inst['stats_port']}/stats/prometheus{ENVOY_QUERY}"
            out.append(Target(inst["name"], inst["service"], "sidecar", url))
    if state.get("edge_stats"):
        url = f"http://{state['edge_stats']}/stats/prometheus{ENVOY_QUERY}"
        out.append(Target("edge", "edge", "edge", url))
    return out


def scrape_all(ts: Iterable[Target], pool: ThreadPoolExecutor) -> dict[tuple[str, str], Samples | None]:
    items = list(ts)
    results = pool.map(lambda t: fetch(t.url), items)
    return {(t.instance, t.kind): r for t, r in zip(items, results, strict=True)}


def _unary(labels: dict[str, str]) -> bool:
    return labels.get("rpc_type") == "unary"


def _hcm(prefix: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get("envoy_http_conn_manager_prefix") == prefix


def compute(
    ts: list[Target],
    before: dict[tuple[str, str], Samples | None],
    after: dict[tuple[str, str], Samples | None],
    seconds: float,
    older: dict[tuple[str, str], Samples | None] | None = None,
) -> tuple[list[Row], Saga]:
    """Rates over before -> after; the Envoys' p99 over older -> after (Envoy refreshes the
    histograms it exposes only at its stats flush, every 5 s, so a 1 s difference is mostly empty)."""
    older = older or before
    rows: dict[str, Row] = {}
    saga = Saga()
    outcomes: dict[str, float] = defaultdict(float)
    for t in ts:
        row = rows.setdefault(t.instance, Row(t.instance, t.service))
        a, b = after.get((t.instance, t.kind)), before.get((t.instance, t.kind))
        if a is None or b is None:
            continue
        if t.kind == "app":
            done = total(a, "rpc_server_requests_total") - total(b, "rpc_server_requests_total")
            failed = total(
                a, "rpc_server_requests_total", lambda x: x["rpc_grpc_status_code"] in SERVER_ERRORS
            ) - total(b, "rpc_server_requests_total", lambda x: x["rpc_grpc_status_code"] in SERVER_ERRORS)
            row.rps = done / seconds
            row.success = (1 - failed / done) if done > 0 else None
            hb, ha = (buckets(s, "rpc_server_duration_seconds", _unary) for s in (b, a))
            for q, attr in ((0.5, "p50_ms"), (0.99, "p99_ms")):
                value = quantile(q, hb, ha)
                setattr(row, attr, None if value is None else value * 1e3)
            row.streams = total(a, "rpc_server_open_streams")
            if t.service == "order":
                for labels, v in a.get("shop_orders_completed_total", ()):
                    prior = sum(pv for pl, pv in b.get("shop_orders_completed_total", ()) if pl == labels)
                    outcomes[labels["outcome"]] += (v - prior) / seconds
                for name, attr in (
                    ("shop_orders_awaiting_settlement", "awaiting"),
                    ("shop_orders_awaiting_settlement_oldest_age_seconds", "oldest_s"),
                    ("shop_order_stuck_sagas", "stuck"),
                ):
                    if name in a:
                        # Every replica sees the same database: the largest reading is the latest.
                        current = getattr(saga, attr)
                        setattr(saga, attr, max(total(a, name), current or 0.0))
        else:
            prefix = INBOUND if t.kind == "sidecar" else "edge"
            match = _hcm(prefix)
            done = total(a, "envoy_http_downstream_rq_total", match) - total(
                b, "envoy_http_downstream_rq_total", match
            )
            row.mesh_rps = done / seconds
            o = older.get((t.instance, t.kind)) or b
            row.mesh_p99_ms = quantile(  # Envoy records milliseconds
                0.99,
                buckets(o, "envoy_http_downstream_rq_time", match),
                buckets(a, "envoy_http_downstream_rq_time", match),
            )
    saga.per_second = {k: outcomes.get(k, 0.0) for k in ("paid", "rejected", "cancelled")}
    return sorted(rows.values(), key=lambda r: (r.service == "edge", r.service, r.instance)), saga


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: list[Row], saga: Saga, run: RunDir) -> Group:
    table = Table(title=f"shop-mesh top  ({run.root})", expand=False)
    for name in (
        "instance",
        "RPS",
        "success",
        "p50 ms",
        "p99 ms",
        "streams",
        "mesh RPS",
        "mesh p99 ms (10 s)",
    ):
        table.add_column(name, justify="left" if name == "instance" else "right")
    for r in rows:
        success = "-" if r.success is None else f"{r.success * 100:.2f}%"
        style = "red" if r.success is not None and r.success < 0.99 else None
        table.add_row(
            r.instance,
            _f(r.rps, ".1f"),
            Text(success, style=style or ""),
            _f(r.p50_ms, ".2f"),
            _f(r.p99_ms, ".2f"),
            _f(r.streams, ".0f"),
            _f(r.mesh_rps, ".1f"),
            _f(r.mesh_p99_ms, ".1f"),
        )
    per = saga.per_second
    saga_line = Text(
        "saga: orders/s "
        + "  ".join(f"{k} {per.get(k, 0.0):.1f}" for k in ("paid", "rejected", "cancelled"))
        + f"   awaiting settlement {_f(saga.awaiting, '.0f')} (oldest {_f(saga.oldest_s, '.1f')} s)"
        + f"   stuck sagas {_f(saga.stuck, '.0f')}"
    )
    note = Text(
        "RPS/success/latency: the app's view (unary RPCs; health checks excluded); "
        "mesh: the sidecar's inbound listener (the edge's downstream)",
        style="dim",
    )
    return Group(table, saga_line, note)


def run_top(
    run: RunDir, *, interval: float = 1.0, iterations: int | None = None, console: Console | None = None
) -> int:
    """Refresh every `interval` seconds until Ctrl-C (or `iterations` frames, for tests and scripts)."""
    from rich.live import Live

    console = console or Console()
    state = read_state(run)
    if state is None or state.get("stopped"):
        console.print(f"no mesh is running (no live {run.state}); start one with `make run`")
        return 1
    frames = 0
    with ThreadPoolExecutor(max_workers=8) as pool, Live(console=console, auto_refresh=False) as live:
        ts = targets(state)
        before, t0 = scrape_all(ts, pool), time.monotonic()
        history = [(t0, before)]
        try:
            while iterations is None or frames < iterations:
                time.sleep(max(interval - (time.monotonic() - t0), 0.05))
                fresh = read_state(run)
                if fresh is not None and not fresh.get("stopped") and targets(fresh) != ts:
                    # Scaled or restarted on new ports: start over from the new targets.
                    ts = targets(fresh)
                    before, t0 = scrape_all(ts, pool), time.monotonic()
                    history = [(t0, before)]
                    continue
                after, t1 = scrape_all(ts, pool), time.monotonic()
                history.append((t1, after))
                while len(history) > 1 and t1 - history[1][0] >= ENVOY_WINDOW_S:
                    history.pop(0)  # keep the newest scrape at least ENVOY_WINDOW_S old
                rows, saga = compute(ts, before, after, t1 - t0, older=history[0][1])
                live.update(render(rows, saga, run), refresh=True)
                before, t0 = after, t1
                frames += 1
        except KeyboardInterrupt:
            pass
    return 0

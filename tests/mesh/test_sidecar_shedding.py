"""CreateOrder overload is refused by the order sidecar (topology `services.order.inbound_max_requests`),
before the app's gRPC stack sees the call, with RESOURCE_EXHAUSTED, and nobody retries the refusal.

One mesh, one replica each. The order sidecar lets SIDECAR_LIMIT unary calls through to its app, while
the app's own MAX_INFLIGHT_UNARY is set far higher: every refusal in the burst must then come from the
sidecar (its breaker's overflow counter, its message), not from the app's second line.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import yaml
from shop.order.v1 import order_pb2_grpc
from shop.user.v1 import user_pb2_grpc

from shop_mesh.mesh.topology import TOPOLOGY_PATH
from tests.mesh.conftest import MeshProcess, create_order_request, running_mesh, sign_up_request, stats
from tests.support import aio_authorized_channel

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh")]

SIDECAR_LIMIT = 4
APP_LIMIT = 256
CALLS = 600
IN_FLIGHT = 150  # far above the limit, below the edge's unary breaker (512): the sidecar must shed


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root = tmp_path_factory.mktemp("sidecar-shedding")
    raw = yaml.safe_load(TOPOLOGY_PATH.read_text())
    raw["services"]["order"]["inbound_max_requests"] = SIDECAR_LIMIT
    raw["edge"]["rate_limit"] = {"max_tokens": 100000, "tokens_per_fill": 100000, "fill_interval": "1s"}
    topology = root / "topology.yaml"
    topology.write_text(yaml.safe_dump(raw, sort_keys=False))
    with running_mesh(
        root / "run", topology=topology, env=[f"order:MAX_INFLIGHT_UNARY={APP_LIMIT}"]
    ) as running:
        yield running


async def test_a_create_order_burst_is_shed_by_the_order_sidecar_and_never_retried(mesh: MeshProcess) -> None:
    sidecar_admin = f"127.0.0.1:{mesh.instance('order-0')['admin_port']}"
    async with aio_authorized_channel(mesh.edge, mesh.admin_token) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        orders = order_pb2_grpc.OrderServiceStub(channel)
        user = (await users.CreateUser(sign_up_request("B"), timeout=15)).user
        edge_before = stats(mesh.edge_admin, "cluster.order.")
        sidecar_before = stats(sidecar_admin, "cluster.local_app.")
        gate = asyncio.Semaphore(IN_FLIGHT)
        codes: Counter[str] = Counter()
        details: Counter[str] = Counter()
        latencies: list[float] = []

        async def one() -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    await orders.CreateOrder(create_order_request(user.user_id), timeout=10)
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    details[f"{exc.code().name}: {exc.details()}"] += 1

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CALLS))), 180)
        edge_after = stats(mesh.edge_admin, "cluster.order.")
        sidecar_after = stats(sidecar_admin, "cluster.local_app.")

    def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    overflow = sum(
        delta(sidecar_before, sidecar_after, f"cluster.local_app.upstream_rq_{kind}_overflow")
        for kind in ("pending", "active")
    )
    edge_retries = delta(edge_before, edge_after, "cluster.order.upstream_rq_retry")
    edge_retry_refused = delta(edge_before, edge_after, "cluster.order.upstream_rq_retry_overflow")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
    print(
        f"\n{CALLS} CreateOrder, {IN_FLIGHT} in flight, sidecar limit {SIDECAR_LIMIT}: {dict(codes)} "
        f"(OK p99 {p99 * 1e3:.0f} ms); sidecar overflow {overflow}; edge retries {edge_retries}, "
        f"retries refused by budget {edge_retry_refused}; {details.most_common(2)}"
    )
    assert sum(codes.values()) == CALLS
    # Shed, not collapsed: only OK or RESOURCE_EXHAUSTED, both seen.
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, details.most_common(5)
    # Every refusal is the sidecar's (its message, its breaker), none the app's second line.
    refused = "RESOURCE_EXHAUSTED: overloaded: too many calls in progress on this order instance; retry later"
    assert set(details) == {refused}, details.most_common(5)
    assert overflow == codes["RESOURCE_EXHAUSTED"]
    # No retry of the refused calls: the edge neither retried nor asked its budget for a retry.
    assert edge_retries == 0 and edge_retry_refused == 0
    assert delta(sidecar_before, sidecar_after, "cluster.local_app.upstream_rq_retry") == 0

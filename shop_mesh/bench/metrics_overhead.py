"""`python -m shop_mesh.bench.metrics_overhead`: the CPU that Prometheus metrics add per RPC and per write
transaction, measured on the real ServerCallWrapper (with and without RpcMetrics) around a trivial
handler, and what the same recording costs with the OpenTelemetry metrics SDK instead of
prometheus_client (the choice in docs/decisions.md). Figures in docs/performance.md.

CPU time (process_time) of N calls, best of R rounds; log level WARNING so the per-RPC log line (the
same with and without metrics) does not drown the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
from shop.user.v1 import user_pb2

from shop_mesh.services.common.interceptors import ServerCallWrapper
from shop_mesh.services.common.logging import configure_logging
from shop_mesh.services.common.metrics import RPC_BUCKETS, RpcMetrics, observe_transaction

METHOD = "/shop.user.v1.UserService/GetUser"
# A valid request: the wrapper checks it against its proto's rules on every call.
REQUEST = user_pb2.GetUserRequest(user_id="usr_01JC" + "0" * 22)


class _Context:
    """The few ServicerContext methods the wrapper uses, answering like a successful call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "bench-1"),)

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


async def _handler(request: Any, context: Any) -> Any:
    return request


def _wrapped(metrics: RpcMetrics | None) -> Callable[[Any, Any], Any]:
    wrapper = ServerCallWrapper(0.0, metrics=metrics)
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_handler)
    return wrapper.wrap(handler, METHOD).unary_unary  # type: ignore[return-value]


def _cpu_per_call(run: Callable[[int], None], n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        run(n)
        best = min(best, (time.process_time() - start) / n)
    return best * 1e6


def wrapper_cost(n: int, rounds: int) -> tuple[float, float]:
    loop = asyncio.new_event_loop()
    context = _Context()

    def runner(call: Callable[[Any, Any], Any]) -> Callable[[int], None]:
        async def many(k: int) -> None:
            for _ in range(k):
                await call(REQUEST, context)

        return lambda k: loop.run_until_complete(many(k))

    try:
        without = _cpu_per_call(runner(_wrapped(None)), n, rounds)
        with_metrics = _cpu_per_call(runner(_wrapped(RpcMetrics())), n, rounds)
    finally:
        loop.close()
    return without, with_metrics


def prometheus_record_cost(n: int, rounds: int) -> float:
    """What RpcMetrics does per call, alone: gauge inc/dec, counter inc, histogram observe (lock-free
    numbers since session 6; prometheus_client objects before)."""
    metrics = RpcMetrics()
    metrics.register("/bench.Service/Prom", streaming=False)

    def run(k: int) -> None:
        for _ in range(k):
            metrics.started("/bench.Service/Prom")
            metrics.finished("/bench.Service/Prom", "OK", 0.002)

    return _cpu_per_call(run, n, rounds)


def otel_record_cost(n: int, rounds: int) -> float:
    """The same four updates through the OpenTelemetry metrics SDK (attributes per call, as its API
    takes them; a reader attached so the instruments really aggregate)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    provider = MeterProvider(
        metric_readers=[InMemoryMetricReader()],
        views=[
            View(
                instrument_name="rpc.server.duration",
                aggregation=ExplicitBucketHistogramAggregation(list(RPC_BUCKETS)),
            )
        ],
    )
    meter = provider.get_meter("bench")
    requests = meter.create_counter("rpc.server.requests")
    duration = meter.create_histogram("rpc.server.duration", unit="s")
    in_flight = meter.create_up_down_counter("rpc.server.in_flight")
    live = {"rpc.service": "bench.Service", "rpc.method": "Otel", "rpc.type": "unary"}
    done = {**live, "rpc.grpc.status_code": "OK"}

    def run(k: int) -> None:
        for _ in range(k):
            in_flight.add(1, live)
            in_flight.add(-1, live)
            requests.add(1, done)
            duration.record(0.002, done)

    try:
        return _cpu_per_call(run, n, rounds)
    finally:
        provider.shutdown()


def transaction_observer_cost(n: int, rounds: int) -> float:
    def run(k: int) -> None:
        for _ in range(k):
            with observe_transaction():
                pass

    return _cpu_per_call(run, n, rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shop_mesh.bench.metrics_overhead", description=__doc__)
    p.add_argument("-n", type=int, default=20_000, help="calls per round")
    p.add_argument("-r", "--rounds", type=int, default=5)
    args = p.parse_args(argv)
    configure_logging("bench", "WARNING")
    without, with_metrics = wrapper_cost(args.n, args.rounds)
    print(f"ServerCallWrapper, unary call, no metrics:   {without:6.2f} µs CPU")
    print(f"ServerCallWrapper, unary call, with metrics: {with_metrics:6.2f} µs CPU")
    print(f"  metrics add per RPC:                       {with_metrics - without:6.2f} µs CPU")
    print(
        f"RpcMetrics, the four updates alone:          {prometheus_record_cost(args.n, args.rounds):6.2f} µs"
    )
    print(f"OpenTelemetry SDK, the same four updates:    {otel_record_cost(args.n, args.rounds):6.2f} µs")
    tx = transaction_observer_cost(args.n, args.rounds)
    print(f"observe_transaction per write transaction:   {tx:6.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

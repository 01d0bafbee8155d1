"""`watch-fanout`: 1,000 concurrent WatchOrder streams through the edge on one order; a status
change of that order must reach every watcher with p99 ≤ 100 ms, and the order app's memory must grow
by ≤ 50 KB per open stream.

1. CreateOrder (through the edge); its stored events are replayed to every new watcher.
2. Open the streams over 10 HTTP/2 connections; a stream counts as open once it has replayed the
   event of the order's current state. A first tenth of the streams is opened as a warm-up; then
   RSS of every process (median of 5 samples) is taken, the other nine tenths are opened, and RSS is
   taken again after a settling second: memory per stream = ΔRSS / streams opened in between.
3. CancelOrder: the new event (CANCELLED, terminal, so each stream then ends with OK) must reach
   every watcher. Delivery latency = the moment a watcher's task got the message minus the event's
   own create_time (same machine, same wall clock); the time since the CancelOrder call was sent
   is reported as well. Messages are read as raw bytes and parsed after the measurement, so the
   client does the least possible work while they arrive (it is still one Python process receiving
   1,000 messages at once; its queueing is part of the figure, so the figure is an upper bound).
   The client runs on uvloop (as the load generator's workers do), and the end of the wait is one
   counter and one future, not an event and a waiting task per watcher: ~1,000 extra task wake-ups
   on the client's one busy thread while the messages arrive, which delayed the later messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Unavailable, describe
from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import Deployment, deployment
from shop_mesh.services.common.server import uvloop_factory

NAME = "watch-fanout"
WATCH = "/shop.order.v1.OrderService/WatchOrder"
CHANNELS = 10


@dataclass
class Watcher:
    received: list[tuple[int, bytes]] = field(default_factory=list)  # (wall ns at receipt, raw message)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    code: str = ""
    opened: bool = False  # replayed up to the order's current state while the stream was live
    mark: int = 1 << 60  # messages seen before the change was triggered
    reached: bool = False  # got a message after `mark`, or ended


@dataclass
class _Reached:
    """Counts the watchers that got the change (or ended); `done` when all have."""

    left: int
    done: asyncio.Future[None]

    def one(self, w: Watcher) -> None:
        if not w.reached:
            w.reached = True
            self.left -= 1
            if self.left <= 0 and not self.done.done():
                self.done.set_result(None)


def _rss(pids: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label, pid in pids.items():
        try:
            out[label] = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            continue
    return out


async def _rss_settled(pids: dict[str, int], samples: int = 5) -> dict[str, int]:
    """Median of a few RSS samples 100 ms apart, per process."""
    taken = []
    for _ in range(samples):
        taken.append(_rss(pids))
        await asyncio.sleep(0.1)
    out: dict[str, int] = {}
    for label in taken[0]:
        values = sorted(t[label] for t in taken if label in t)
        out[label] = values[len(values) // 2]
    return out


async def _scenario(ctx: RunContext, dep: Deployment, result: ScenarioResult) -> None:
    import grpc
    from shop.common.v1 import money_pb2
    from shop.order.v1 import order_pb2, order_pb2_grpc

    target = dep.edge or dep.direct["order"]
    n = ctx.options.scaled(ctx.options.streams, 20)
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    watchers = [Watcher() for _ in range(n)]
    reached = _Reached(n, asyncio.get_running_loop().create_future())
    tasks: list[asyncio.Task[None]] = []
    try:
        stub = order_pb2_grpc.OrderServiceStub(channels[0])
        created = await stub.CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=f"bench-watch-{uuid.uuid4().hex}",
                user_id=dep.user_ids[0],
                line_items=[
                    order_pb2.LineItem(
                        sku="SKU-WATCH", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=5)
                    )
                ],
                payment_method_token="tok_visa",
            ),
            timeout=10,
            metadata=dep.auth(target),
        )
        order = created.order
        if order.state in (
            order_pb2.ORDER_STATE_PAID,
            order_pb2.ORDER_STATE_REJECTED,
            order_pb2.ORDER_STATE_CANCELLED,
        ):
            raise Unavailable(f"the new order is already terminal ({order_pb2.OrderState.Name(order.state)})")
        current_state = order.state
        request = order_pb2.WatchOrderRequest(order_id=order.order_id).SerializeToString()

        async def watch(w: Watcher, ch: grpc.aio.Channel) -> None:
            stream: Any = ch.unary_stream(WATCH, request_serializer=None, response_deserializer=None)
            call = stream(request, metadata=dep.auth(target))
            received = w.received
            try:
                async for raw in call:
                    received.append((time.time_ns(), raw))
                    if len(received) > w.mark:
                        reached.one(w)
                    if not w.ready.is_set():
                        ev = order_pb2.WatchOrderResponse.FromString(raw).event
                        if ev.state == current_state:
                            w.opened = True
                            w.ready.set()
                w.code = "OK"
            except grpc.aio.AioRpcError as exc:
                w.code = exc.code().name
            finally:
                w.ready.set()
                reached.one(w)

        async def open_streams(group: list[Watcher], offset: int) -> None:
            for i, w in enumerate(group):
                tasks.append(asyncio.create_task(watch(w, channels[(offset + i) % CHANNELS])))
                if i % 100 == 99:
                    await asyncio.sleep(0)  # let the first streams start while the rest are created
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in group)), timeout=60)

        # A first tenth of the streams warms up whatever a process allocates once (connections,
        # buffers, caches); memory per stream is measured over the other nine tenths.
        warm_n = max(1, n // 10)
        t_open = time.monotonic()
        await open_streams(watchers[:warm_n], 0)
        gc.collect()
        await asyncio.sleep(1.0)
        before = await _rss_settled(dep.pids)
        await open_streams(watchers[warm_n:], warm_n)
        open_s = time.monotonic() - t_open
        opened = sum(1 for w in watchers if w.opened and not w.code)
        opened_measured = sum(1 for w in watchers[warm_n:] if w.opened and not w.code)
        await asyncio.sleep(1.0)
        after = await _rss_settled(dep.pids)
        seen_before = [len(w.received) for w in watchers]
        for w, k in zip(watchers, seen_before, strict=True):
            w.mark = k
            if w.code:
                reached.one(w)

        # The client's collector: with 1,000 streams' objects young, one collection mid-delivery
        # took 10-13 ms of the client's CPU (all later messages waited); frozen, 2-5 ms.
        gc.collect()
        gc.freeze()
        t_trigger = time.time_ns()
        cancel = order_pb2.CancelOrderRequest(
            request_id=f"bench-cancel-{uuid.uuid4().hex}", order_id=order.order_id, reason="benchmark"
        )
        cancel_error = ""
        for _attempt in range(3):  # same request_id: a repeat has no second effect
            try:
                await stub.CancelOrder(cancel, timeout=10, metadata=dep.auth(target))
                cancel_error = ""
                break
            except grpc.aio.AioRpcError as exc:
                cancel_error = f"CancelOrder {exc.code().name}: {exc.details()}"
        result.extra["cancel_error"] = cancel_error
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reached.done), timeout=30)

        from_event = Histogram.empty()
        from_call = Histogram.empty()
        missed = 0
        errors: dict[str, int] = {}
        for w, k in zip(watchers, seen_before, strict=True):
            if len(w.received) <= k:
                missed += 1
                code = w.code or "NOT_DELIVERED"
                errors[code] = errors.get(code, 0) + 1
                continue
            recv_ns, raw = w.received[k]
            ev = order_pb2.WatchOrderResponse.FromString(raw).event
            created_ns = ev.create_time.seconds * 1_000_000_000 + ev.create_time.nanos
            from_event.record(recv_ns - created_ns if created_ns else recv_ns - t_trigger)
            from_call.record(recv_ns - t_trigger)

        app = "order"
        per_stream = {
            label: (after[label] - before[label]) / opened_measured / 1024
            for label in before
            if label in after and opened_measured > 0
        }
        result.extra.update(
            {
                "streams": n,
                "opened": opened,
                "open_seconds": open_s,
                "rss_before": before,
                "rss_after": after,
                "kb_per_stream": per_stream,
                "target": target,
            }
        )
        via = "edge" if dep.edge else "direct, no mesh (info)"
        summary = RunSummary.from_histogram(
            f"WatchOrder fan-out to {n} streams ({via}), delivery after the event",
            from_event,
            target=target,
            mode="streams",
            ok=from_event.total,
            errors=errors,
            duration_s=max(1e-9, (from_call.max_ns or 1) / 1e9),
        )
        call_summary = RunSummary.from_histogram(
            "… delivery after the CancelOrder call was sent",
            from_call,
            target=target,
            mode="streams",
            ok=from_call.total,
            errors=errors,
            duration_s=max(1e-9, (from_call.max_ns or 1) / 1e9),
        )
        from shop_mesh.bench.report import print_run

        print_run(ctx.console, summary)
        print_run(ctx.console, call_summary)
        ctx.console.print(
            f"  streams opened: {opened}/{n} in {open_s:.2f} s; KB per stream: "
            + ", ".join(f"{k} {v:.1f}" for k, v in per_stream.items())
        )
        result.runs.extend([summary, call_summary])
        result.extra["series"] = [summary.label]
        gated = dep.edge is not None
        note = "" if gated else dep.mesh_unavailable
        result.figures.append(
            Figure(
                NAME,
                f"p99 delivery to {n} watchers",
                summary.latency_ms["p99"] if from_event.total else None,
                "ms",
                "≤ 100 ms",
                target_value=100.0 if gated else None,
                compare="<=" if gated else None,
                note=note or ("no watcher got the event" if not from_event.total else ""),
            )
        )
        result.figures.append(
            Figure(
                NAME,
                f"streams open before the change ({open_s:.1f} s)",
                opened,
                "streams",
                "info",
            )
        )
        result.figures.append(
            Figure(
                NAME,
                "watchers that missed the change",
                float(missed),
                "streams",
                "= 0",
                target_value=0.0 if gated else None,
                compare="<=" if gated else None,
                note=note or cancel_error,
            )
        )
        result.figures.append(
            Figure(
                NAME,
                "order app memory per open stream",
                per_stream.get(app),
                "KB",
                "≤ 50 KB",
                target_value=50.0 if gated else None,
                compare="<=" if gated else None,
                note=note or ("" if app in per_stream else f"only {opened_measured} streams opened"),
            )
        )
    finally:
        gc.unfreeze()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    try:
        dep = deployment(ctx)
        with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
            runner.run(asyncio.wait_for(_scenario(ctx, dep, result), timeout=180))
    except Unavailable as exc:
        result.unavailable = str(exc)
    except Exception as exc:
        result.unavailable = describe(exc)
    return result

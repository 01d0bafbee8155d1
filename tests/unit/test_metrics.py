"""The metric helpers without a mesh: after-commit records, bounded reason labels, the wrapper's
per-method recording, and mesh top's rate/quantile arithmetic."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY, Counter

from shop_mesh.mesh.top import Samples, Target, compute, parse, quantile
from shop_mesh.services.common import metrics
from shop_mesh.services.common.metrics import RPC_BUCKETS, RpcMetrics, on_commit, reason_label

_TEST_COUNTER = Counter("test_after_commit", "unit test only")


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_recording", True)


def test_a_record_counts_only_when_its_transaction_commits(recording: None) -> None:
    before = _TEST_COUNTER._value.get()
    with metrics.observe_transaction():
        on_commit(_TEST_COUNTER.inc)
        assert _TEST_COUNTER._value.get() == before  # not yet: the commit has not happened
    assert _TEST_COUNTER._value.get() == before + 1
    with pytest.raises(RuntimeError), metrics.observe_transaction():
        on_commit(_TEST_COUNTER.inc)
        raise RuntimeError("rolled back")
    assert _TEST_COUNTER._value.get() == before + 1  # the rolled-back change is never counted
    on_commit(_TEST_COUNTER.inc)  # outside a transaction: at once
    assert _TEST_COUNTER._value.get() == before + 2


def test_reason_labels_keep_codes_and_drop_free_text() -> None:
    assert reason_label("PAYMENT_DECLINED") == "PAYMENT_DECLINED"
    assert reason_label("changed my mind") == "OTHER"
    assert reason_label("ord_01JABCDEFGHJKMNPQRSTVWXYZ0") == "OTHER"
    assert reason_label("") == "OTHER"


def test_rpc_metrics_count_by_method_and_code() -> None:
    rpc = RpcMetrics()
    method = "/unit.Service/Call"
    rpc.register(method, streaming=False)
    labels = {"rpc_service": "unit.Service", "rpc_method": "Call", "rpc_type": "unary"}
    coded = {**labels, "rpc_grpc_status_code": "NOT_FOUND"}

    def sample(name: str, **extra: str) -> float:
        return REGISTRY.get_sample_value(name, {**coded, **extra}) or 0.0

    before = sample("rpc_server_requests_total")
    below, on = (sample("rpc_server_duration_seconds_bucket", le=le) for le in ("0.0025", "0.005"))
    rpc.started(method)
    assert REGISTRY.get_sample_value("rpc_server_in_flight", labels) == 1
    rpc.finished(method, "NOT_FOUND", 0.003)
    rpc.started("/unregistered/Method")  # e.g. health checks: ignored, no new series
    rpc.finished("/unregistered/Method", "OK", 0.001)
    assert REGISTRY.get_sample_value("rpc_server_in_flight", labels) == 0
    assert sample("rpc_server_requests_total") == before + 1
    assert sample("rpc_server_duration_seconds_count") == before + 1
    assert sample("rpc_server_duration_seconds_sum") >= 0.003
    rpc.started(method)
    rpc.finished(method, "NOT_FOUND", 0.005)  # on a bound: counted in it (le is inclusive)
    assert sample("rpc_server_duration_seconds_bucket", le="0.0025") == below
    assert sample("rpc_server_duration_seconds_bucket", le="0.005") == on + 2
    assert sample("rpc_server_duration_seconds_bucket", le="+Inf") == before + 2
    assert len(RPC_BUCKETS) + 1 == sum(
        1
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == "rpc_server_duration_seconds_bucket" and s.labels.get("rpc_method") == "Call"
    )
    assert "unregistered" not in str(list(REGISTRY.collect()))


def test_quantile_interpolates_like_histogram_quantile() -> None:
    before = {0.1: 0.0, 0.5: 0.0, float("inf"): 0.0}
    after = {0.1: 50.0, 0.5: 100.0, float("inf"): 100.0}
    assert quantile(0.5, before, after) == pytest.approx(0.1)
    assert quantile(0.75, before, after) == pytest.approx(0.3)  # halfway through (0.1, 0.5]
    assert quantile(0.99, before, before) is None  # nothing observed in between


def test_top_rates_success_and_saga_from_two_scrapes() -> None:
    def app(ok: int, failed: int, paid: int) -> str:
        return (
            f'rpc_server_requests_total{{rpc_type="unary",rpc_grpc_status_code="OK"}} {ok}\n'
            f'rpc_server_requests_total{{rpc_type="unary",rpc_grpc_status_code="UNAVAILABLE"}} {failed}\n'
            f'rpc_server_requests_total{{rpc_type="unary",rpc_grpc_status_code="NOT_FOUND"}} 5\n'
            f'shop_orders_completed_total{{outcome="paid",reason=""}} {paid}\n'
            "shop_orders_awaiting_settlement 3\n"
        )

    ts = [Target("order-0", "order", "app", "")]
    before: dict[tuple[str, str], Samples | None] = {("order-0", "app"): parse(app(100, 0, 10))}
    after: dict[tuple[str, str], Samples | None] = {("order-0", "app"): parse(app(298, 2, 30))}
    rows, saga = compute(ts, before, after, 2.0)
    assert rows[0].rps == pytest.approx(100.0)
    assert rows[0].success == pytest.approx(0.99)  # NOT_FOUND is an answer, UNAVAILABLE a failure
    assert saga.per_second["paid"] == pytest.approx(10.0)
    assert saga.awaiting == 3


async def test_a_sampling_job_outlives_a_failing_sample_and_stops_when_asked() -> None:
    # The shared job behind order's and payment's gauges: the event reader's lag, sampled until stop.
    stopping = asyncio.Event()
    calls = 0

    async def sample() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database down")  # skipped: the next round samples again
        metrics.record_event_log_lag("unit_test_log", 12, 9)
        metrics.record_event_log_lag("unit_test_unstarted", 12, None)  # no reader yet: no series
        if calls == 3:
            stopping.set()

    await asyncio.wait_for(metrics.sampling_job(sample, interval=0.001)(stopping), 10)
    assert calls == 3
    lag = "event_log_reader_lag_events"
    assert REGISTRY.get_sample_value(lag, {"log": "unit_test_log"}) == 3
    assert REGISTRY.get_sample_value(lag, {"log": "unit_test_unstarted"}) is None

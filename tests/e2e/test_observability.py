"""What an operator sees: one JSON log line per RPC carrying its request id and trace id, and the
same trace exported over OTLP/gRPC to a collector (a real OTLP endpoint served by this test)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from tests.support import ServiceProcess, free_port, wait_serving


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.arrived = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, str, str]]:
        """(service.name, span name, trace id hex) of every exported span."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        found.append((attrs.get("service.name", ""), span.name, span.trace_id.hex()))
        return found


async def test_rpc_is_logged_as_json_and_traced_over_otlp(tmp_path: Path) -> None:
    collector = Collector()
    otlp = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    await otlp.start()
    env = {
        "PORT": str(free_port()),
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": "",
        "USER_DATABASE_URL": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
    }
    service = ServiceProcess("user", env, tmp_path / "user.log")
    try:
        await wait_serving(service.address, "shop.user.v1.UserService", timeout=30)
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = user_pb2_grpc.UserServiceStub(channel)
            await stub.CreateUser(
                user_pb2.CreateUserRequest(request_id="obs-1", email="obs@example.com", display_name="Obs"),
                metadata=[("x-request-id", "req-obs-123")],
                timeout=10,
            )
        method = "/shop.user.v1.UserService/CreateUser"
        async with asyncio.timeout(15):
            while not any(name == method for _, name, _ in collector.spans()):
                collector.arrived.clear()
                await collector.arrived.wait()
        service_name, _, trace_id = next(s for s in collector.spans() if s[1] == method)
        assert service_name == "shop-user"

        service.signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
        lines = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
        rpc_lines = [line for line in lines if line.get("event") == "rpc" and line.get("method") == method]
        assert len(rpc_lines) == 1  # one line per RPC
        assert rpc_lines[0]["request_id"] == "req-obs-123"
        assert rpc_lines[0]["trace_id"] == trace_id
        assert rpc_lines[0]["code"] == "OK"
        assert rpc_lines[0]["service"] == "user"
    finally:
        service.kill()
        await otlp.stop(0)

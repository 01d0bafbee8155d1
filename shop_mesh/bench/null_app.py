"""Null services for the `saga-floor` scenario: the same RPCs as user, order and payment, doing nothing.

    NULL_SERVICE=user|order|payment PORT=<n> python -m shop_mesh.bench.null_app

The mesh runner starts them in place of the real apps (`--env MESH_APP_MODULE=shop_mesh.bench.null_app`), so
the
floor runs the very same topology: edge, sidecars with mTLS, RBAC and retries. Every method of the
service is built from its generated descriptor and answers a canned response (the response type's
default message, serialized once) with no database, no interceptors and no logging. Streaming methods
end at once. grpc.health.v1 Check answers SERVING for any name (the runner and the sidecars' health
checks ask).

Order's CreateOrder is the saga driver: it makes the saga's three upstream calls in order, GetUser,
AuthorizePayment, CapturePayment, through its sidecar's outbound listeners (USER_SERVICE_ADDR,
PAYMENT_SERVICE_ADDR), with the deadline it has left, and then answers. What the saga costs beyond this
is the project's own code; what this costs is the floor of Python gRPC plus the mesh on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2_grpc
from shop.order.v1 import order_pb2
from shop.payment.v1 import payment_pb2
from shop.user.v1 import user_pb2

from shop_mesh.bench.baseline_server import ServingHealth, serve_until_signalled

SERVICES: dict[str, ServiceDescriptor] = {
    "user": user_pb2.DESCRIPTOR.services_by_name["UserService"],
    "order": order_pb2.DESCRIPTOR.services_by_name["OrderService"],
    "payment": payment_pb2.DESCRIPTOR.services_by_name["PaymentService"],
}

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _canned(method: MethodDescriptor) -> tuple[type[Any], bytes]:
    request_type = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)()
    return request_type, response.SerializeToString()


def _unary(answer: bytes) -> Handler:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return answer

    return handle


def _stream(answer: bytes) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        return
        yield answer  # pragma: no cover - makes this an async generator that ends at once

    return handle


class SagaDriver:
    """CreateOrder of the null order service: the saga's three upstream calls, nothing else."""

    def __init__(self, user_addr: str, payment_addr: str, answer: bytes):
        self.answer = answer
        self.user_channel = grpc.aio.insecure_channel(user_addr)
        self.payment_channel = grpc.aio.insecure_channel(payment_addr)
        serialize = _serialize
        self.get_user: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = self.user_channel.unary_unary(
            "/shop.user.v1.UserService/GetUser", request_serializer=serialize, response_deserializer=None
        )
        self.authorize: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = self.payment_channel.unary_unary(
            "/shop.payment.v1.PaymentService/AuthorizePayment",
            request_serializer=serialize,
            response_deserializer=None,
        )
        self.capture: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = self.payment_channel.unary_unary(
            "/shop.payment.v1.PaymentService/CapturePayment",
            request_serializer=serialize,
            response_deserializer=None,
        )

    async def create_order(
        self, request: order_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        left = context.time_remaining()
        timeout = min(left, 10.0) if left is not None else 10.0
        await self.get_user(user_pb2.GetUserRequest(user_id=request.user_id), timeout=timeout)
        order_id = f"ord-{request.request_id}"
        await self.authorize(
            payment_pb2.AuthorizePaymentRequest(
                request_id=f"{request.request_id}-authorize",
                order_id=order_id,
                amount=request.line_items[0].unit_price if request.line_items else None,
                payment_method_token=request.payment_method_token,
            ),
            timeout=timeout,
        )
        await self.capture(
            payment_pb2.CapturePaymentRequest(
                request_id=f"{request.request_id}-capture", payment_id=order_id
            ),
            timeout=timeout,
        )
        return self.answer

    async def close(self) -> None:
        await self.user_channel.close()
        await self.payment_channel.close()


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def build_handler(service: str, driver: SagaDriver | None = None) -> grpc.GenericRpcHandler:
    """A generic handler answering every method of the service from its descriptor."""
    desc = SERVICES[service]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in desc.methods:
        request_type, answer = _canned(method)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(answer), request_deserializer=request_type.FromString
            )
            continue
        handle: Handler = _unary(answer)
        if driver is not None and method.name == "CreateOrder":
            handle = driver.create_order
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=request_type.FromString
        )
    return grpc.method_handlers_generic_handler(desc.full_name, handlers)


async def serve(service: str, host: str, port: int) -> None:
    driver: SagaDriver | None = None
    if service == "order":
        _, answer = _canned(SERVICES["order"].methods_by_name["CreateOrder"])
        driver = SagaDriver(os.environ["USER_SERVICE_ADDR"], os.environ["PAYMENT_SERVICE_ADDR"], answer)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((build_handler(service, driver),))
    health_pb2_grpc.add_HealthServicer_to_server(ServingHealth(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"null {service} service on {host}:{bound}", flush=True)
    await serve_until_signalled(server)
    if driver is not None:
        await driver.close()


def main() -> int:
    service = os.environ.get("NULL_SERVICE", "")
    if service not in SERVICES:
        print(f"NULL_SERVICE must be one of {sorted(SERVICES)}, not {service!r}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(service, os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "0"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

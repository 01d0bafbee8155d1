"""OrderService over gRPC: validate and convert (mapping), call the use case, convert back."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from shop.order.v1 import order_pb2, order_pb2_grpc

from shop_mesh.services.common.context import current_principal
from shop_mesh.services.order import mapping
from shop_mesh.services.order.cancel import CancelOrder
from shop_mesh.services.order.model import OrderEvent
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.saga import OrderSaga

Context = grpc.aio.ServicerContext[Any, Any]


# Live events reach every watcher of an order at once: each is converted once, not once per stream.
_WIRE_CACHE_SIZE = 256


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    def __init__(
        self, queries: OrderQueries, saga: OrderSaga, cancellation: CancelOrder, stopping: asyncio.Event
    ):
        self.queries = queries
        self.saga = saga
        self.cancellation = cancellation
        self.stopping = stopping
        self._wire: OrderedDict[int, order_pb2.WatchOrderResponse] = OrderedDict()

    def _watch_response(self, event: OrderEvent) -> order_pb2.WatchOrderResponse:
        # Keyed by sequence: unique per event in this order database, and an event never changes.
        response = self._wire.get(event.sequence)
        if response is None:
            response = order_pb2.WatchOrderResponse(event=mapping.event_to_proto(event))
            self._wire[event.sequence] = response
            if len(self._wire) > _WIRE_CACHE_SIZE:
                self._wire.popitem(last=False)
        return response

    async def CreateOrder(
        self, request: order_pb2.CreateOrderRequest, context: Context
    ) -> order_pb2.CreateOrderResponse:
        order = await self.saga.create_order(
            mapping.new_order_from_proto(request), principal=current_principal()
        )
        return order_pb2.CreateOrderResponse(order=mapping.order_to_proto(order))

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        order = await self.queries.get_order(request.order_id, principal=current_principal())
        return order_pb2.GetOrderResponse(order=mapping.order_to_proto(order))

    async def ListOrders(
        self, request: order_pb2.ListOrdersRequest, context: Context
    ) -> order_pb2.ListOrdersResponse:
        user_id, page, filter_key = mapping.list_from_proto(request)
        found = await self.queries.list_orders(user_id, page, principal=current_principal())
        return mapping.list_to_proto(found, filter_key)

    async def CancelOrder(
        self, request: order_pb2.CancelOrderRequest, context: Context
    ) -> order_pb2.CancelOrderResponse:
        order = await self.cancellation.cancel_order(
            *mapping.cancel_from_proto(request), principal=current_principal()
        )
        return order_pb2.CancelOrderResponse(order=mapping.order_to_proto(order))

    async def WatchOrder(
        self, request: order_pb2.WatchOrderRequest, context: Context
    ) -> AsyncIterator[order_pb2.WatchOrderResponse]:
        order_id, after = mapping.watch_from_proto(request)
        # Ends OK after a final event; on shutdown StreamShutdown becomes UNAVAILABLE (interceptor).
        async for event in self.queries.watch_order(
            order_id, after, self.stopping, principal=current_principal()
        ):
            yield self._watch_response(event)

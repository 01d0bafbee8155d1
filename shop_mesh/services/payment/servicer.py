"""PaymentService over gRPC: validate and convert via mapping, call the domain, convert back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc

from shop_mesh.services.common.context import current_principal
from shop_mesh.services.payment import mapping
from shop_mesh.services.payment.domain import PaymentProcessor

Context = grpc.aio.ServicerContext[Any, Any]


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self, processor: PaymentProcessor, stopping: asyncio.Event):
        self.processor = processor
        self.stopping = stopping

    async def AuthorizePayment(
        self, request: payment_pb2.AuthorizePaymentRequest, context: Context
    ) -> payment_pb2.AuthorizePaymentResponse:
        payment = await self.processor.authorize(
            mapping.authorize_command(request), principal=current_principal()
        )
        return payment_pb2.AuthorizePaymentResponse(payment=mapping.payment_to_proto(payment))

    async def CapturePayment(
        self, request: payment_pb2.CapturePaymentRequest, context: Context
    ) -> payment_pb2.CapturePaymentResponse:
        target = mapping.payment_target(request)
        payment = await self.processor.capture(target.request_id, target.payment_id)
        return payment_pb2.CapturePaymentResponse(payment=mapping.payment_to_proto(payment))

    async def VoidPayment(
        self, request: payment_pb2.VoidPaymentRequest, context: Context
    ) -> payment_pb2.VoidPaymentResponse:
        target = mapping.payment_target(request)
        payment = await self.processor.void(target.request_id, target.payment_id)
        return payment_pb2.VoidPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def RefundPayment(
        self, request: payment_pb2.RefundPaymentRequest, context: Context
    ) -> payment_pb2.RefundPaymentResponse:
        payment = await self.processor.refund(mapping.refund_command(request))
        return payment_pb2.RefundPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, context: Context
    ) -> payment_pb2.GetPaymentResponse:
        payment = await self.processor.get(mapping.payment_id(request), principal=current_principal())
        return payment_pb2.GetPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def ListPayments(
        self, request: payment_pb2.ListPaymentsRequest, context: Context
    ) -> payment_pb2.ListPaymentsResponse:
        query = mapping.list_query(request)
        page = await self.processor.list_payments(query.order_id, query.page, principal=current_principal())
        return mapping.list_response(page, query)

    async def WatchPaymentEvents(
        self, request: payment_pb2.WatchPaymentEventsRequest, context: Context
    ) -> AsyncIterator[payment_pb2.WatchPaymentEventsResponse]:
        query = mapping.watch_query(request)
        async for event in self.processor.watch(
            query.after_sequence, query.order_id, self.stopping, principal=current_principal()
        ):
            yield payment_pb2.WatchPaymentEventsResponse(event=mapping.event_to_proto(event))

"""Status codes a client sees through the real edge and sidecars (one mesh, one replica each).

- a method no contract has is UNIMPLEMENTED (the edge answers it), a known method the edge may not
  call stays PERMISSION_DENIED (the callee's RBAC);
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from shop.common.v1 import money_pb2
from shop.payment.v1 import payment_pb2, payment_pb2_grpc

from services.common.ids import new_id
from tests.mesh.conftest import MeshProcess, running_mesh

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    with running_mesh(tmp_path_factory.mktemp("edge-statuses") / "run") as running:
        yield running


def _raw_call(channel: grpc.Channel, path: str) -> grpc.RpcError:
    call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    return info.value


def test_unknown_method_of_a_known_service_is_unimplemented(mesh: MeshProcess) -> None:
    with grpc.insecure_channel(mesh.edge) as channel:
        for path in (
            "/shop.order.v1.OrderService/NoSuchMethod",
            "/shop.user.v1.UserService/getuser",  # misspelt (case)
            "/shop.payment.v1.PaymentService/",
            "/shop.nothing.v1.NothingService/Get",  # unknown service
        ):
            err = _raw_call(channel, path)
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, (path, err.code(), err.details())


def test_known_method_the_edge_may_not_call_is_permission_denied(mesh: MeshProcess) -> None:
    with grpc.insecure_channel(mesh.edge) as channel:
        stub = payment_pb2_grpc.PaymentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.AuthorizePayment(
                payment_pb2.AuthorizePaymentRequest(
                    request_id=f"edge-{new_id('x')}",
                    order_id=new_id("ord"),
                    amount=money_pb2.Money(currency_code="EUR", units=5),
                    payment_method_token="tok_visa",
                ),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()

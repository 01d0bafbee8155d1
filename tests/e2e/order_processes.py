"""The three real services as processes (`python -m shop_mesh.services.X`) on SQLite files, for e2e tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import ServiceProcess, free_port, wait_serving

SERVICES = {
    "user": "shop.user.v1.UserService",
    "payment": "shop.payment.v1.PaymentService",
    "order": "shop.order.v1.OrderService",
}


@dataclass
class Processes:
    user: ServiceProcess
    payment: ServiceProcess
    order: ServiceProcess

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.logs()[-4000:]}" for p in (self.user, self.payment, self.order))


@contextmanager
def three_services(
    tmp_path: Path,
    *,
    order_env: dict[str, str] | None = None,
    payment_env: dict[str, str] | None = None,
    order_module: str | None = None,
) -> Iterator[Processes]:
    """`order_module`: run the order service as this module (a test wrapper injecting faults)."""
    started: list[ServiceProcess] = []
    try:
        ports = {name: free_port() for name in SERVICES}
        common = {"DATA_DIR": str(tmp_path), "EVENT_POLL_INTERVAL_SECONDS": "0.05"}
        user = ServiceProcess("user", {**common, "PORT": str(ports["user"])}, tmp_path / "user.log")
        started.append(user)
        payment = ServiceProcess(
            "payment",
            {**common, "PORT": str(ports["payment"]), **(payment_env or {})},
            tmp_path / "payment.log",
        )
        started.append(payment)
        order = ServiceProcess(
            "order",
            {
                **common,
                "PORT": str(ports["order"]),
                "USER_SERVICE_ADDR": user.address,
                "PAYMENT_SERVICE_ADDR": payment.address,
                **(order_env or {}),
            },
            tmp_path / "order.log",
            module=order_module,
        )
        started.append(order)

        async def ready() -> None:
            await asyncio.gather(*(wait_serving(p.address, SERVICES[p.name], 30) for p in started))

        asyncio.run(ready())
        yield Processes(user, payment, order)
    finally:
        for process in started:
            process.kill()

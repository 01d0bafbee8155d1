"""The order service with test fault injection: `python -m tests.integration.order_with_faults`.

The crash/recovery and drain tests run this instead of `python -m shop_mesh.services.order`. The hook is
injected
through the composition root (`build(..., step_hook=...)`), so production wiring carries no fault code.
Environment (read here, not by the service's settings):
  ORDER_TEST_CRASH_AFTER=authorize   exit 137 (like SIGKILL: no cleanup, no drain) right after that saga
                                     step is stored
  ORDER_TEST_STEP_DELAY_SECONDS=N    sleep N seconds in every saga step (drain tests need slow calls)
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable

from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.server import run_service
from shop_mesh.services.order.app import build
from shop_mesh.services.order.config import OrderSettings

log = get_logger("order")


def fault_hook(crash_after: str, step_delay: float) -> Callable[[str], Awaitable[None]]:
    async def hook(step: str) -> None:
        if step_delay:
            await asyncio.sleep(step_delay)
        if crash_after == step:
            log.warning("test_crash", after=step)
            os._exit(137)

    return hook


def main() -> None:
    hook = fault_hook(
        os.environ.get("ORDER_TEST_CRASH_AFTER", ""),
        float(os.environ.get("ORDER_TEST_STEP_DELAY_SECONDS", "0")),
    )
    run_service(OrderSettings(), functools.partial(build, step_hook=hook))


if __name__ == "__main__":
    main()

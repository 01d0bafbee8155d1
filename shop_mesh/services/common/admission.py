"""Admission control in the process: a cap on open server streams, so held streams cannot eat the
memory and event-loop time that unary calls need. Beyond the cap a new stream is refused at once with
RESOURCE_EXHAUSTED (the mesh never retries it; the client may retry later or elsewhere).

The mesh gives streams their own circuit-breaker budget too (docs/mesh.md); this is the process's own
line, which holds whatever proxy is in front of it. Health and reflection streams are not counted.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import code_pb2

from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.status import plain_status

log = get_logger("admission")

TOO_MANY_STREAMS = "TOO_MANY_STREAMS"


class StreamAdmission:
    """Counts open streams; `enter()` admits one if there is room. Single event loop: no lock."""

    def __init__(self, max_open_streams: int):
        self.max_open_streams = max_open_streams
        self.open = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.open >= self.max_open_streams:
            self.refused += 1
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        if self.refused == 1 or self.refused % 100 == 0:  # bounded logging under a flood
            log.warning("stream_refused", method=method, open=self.open, refused=self.refused)
        await context.abort_with_status(
            plain_status(
                code_pb2.RESOURCE_EXHAUSTED,
                f"too many open streams on this instance (limit {self.max_open_streams}); retry later",
                TOO_MANY_STREAMS,
            )
        )

"""Admission control in the process: caps on open server streams and on unary calls in progress.

Streams: held streams cannot eat the memory and event-loop time that unary calls need. Unary calls:
past its capacity a process would otherwise accept every call, queue it on the event loop and serve
all of them too late (the saga collapsed at 2 x capacity: p99 in seconds, callers' deadlines passed,
work done for nobody). Beyond either cap a new call is refused at once with RESOURCE_EXHAUSTED: cheap
to answer, never retried by the mesh (no route's `retry_on` has `resource-exhausted`), and not
UNAVAILABLE, which means "a transient fault another replica may heal".

The mesh gives streams their own circuit-breaker budget too (docs/mesh.md); these are the process's
own lines, which hold whatever proxy is in front of it. Health and reflection are never counted.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import code_pb2

from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.status import plain_status

log = get_logger("admission")

TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"
DEADLINE_TOO_SHORT = "DEADLINE_TOO_SHORT"


class Admission:
    """Counts calls in progress; `enter()` admits one if there is room, `leave()` frees it.

    Single event loop: no lock, and enter/leave are an int compare and add on the hot path.
    """

    def __init__(self, limit: int, what: str, reason: str):
        self.limit = limit
        self.what = what  # for the message: "open streams", "calls in progress"
        self.reason = reason  # ErrorInfo reason of a refusal
        self.open = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        if self.refused == 1 or self.refused % 100 == 0:  # bounded logging under a flood
            log.warning("call_refused", method=method, kind=self.reason, open=self.open, refused=self.refused)
        await context.abort_with_status(
            plain_status(
                code_pb2.RESOURCE_EXHAUSTED,
                f"too many {self.what} on this instance (limit {self.limit}); retry later",
                self.reason,
            )
        )


class StreamAdmission(Admission):
    """The cap on open server streams (MAX_OPEN_STREAMS)."""

    def __init__(self, max_open_streams: int):
        super().__init__(max_open_streams, "open streams", TOO_MANY_STREAMS)


class UnaryAdmission(Admission):
    """The cap on unary calls in progress (MAX_INFLIGHT_UNARY), and the shedding of calls whose
    deadline leaves less than `min_deadline_s`: such a call would time out in the queue or the saga
    anyway, after spending the capacity admitted calls need."""

    def __init__(self, max_inflight: int, min_deadline_s: float = 0.0):
        super().__init__(max_inflight, "calls in progress", TOO_MANY_REQUESTS)
        self.min_deadline_s = min_deadline_s
        self.too_late = 0

    async def refuse_deadline(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, remaining: float
    ) -> None:
        self.too_late += 1
        if self.too_late == 1 or self.too_late % 100 == 0:
            log.warning("call_refused", method=method, kind=DEADLINE_TOO_SHORT, refused=self.too_late)
        await context.abort_with_status(
            plain_status(
                code_pb2.RESOURCE_EXHAUSTED,
                f"deadline too short to serve ({remaining * 1e3:.0f} ms left, "
                f"this instance needs at least {self.min_deadline_s * 1e3:.0f} ms); retry with a longer one",
                DEADLINE_TOO_SHORT,
            )
        )

"""Domain errors. Domain code raises these; one place (shop_mesh.services.common.status) maps them to gRPC.

No gRPC or protobuf here: the domain layer must stay importable without either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# How much of a client's value an error message may quote: enough to recognise it, never enough to
# blow the client's metadata limit (a 100 KB field echoed whole came back as RESOURCE_EXHAUSTED).
QUOTE_LIMIT = 64


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied value as an error message may show it: repr() of at most `limit` characters."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path in the request message (e.g. line_items[2].quantity)."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every expected failure. `reason` becomes the google.rpc.ErrorInfo reason (UPPER_SNAKE)."""

    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation], *, reason: str | None = None):
        self.violations = list(violations)
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(f"invalid request: {fields}", reason=reason)


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """A concurrent change won; the client may retry the whole operation."""

    reason = "ABORTED"


class Unavailable(DomainError):
    """A transient fault (database or upstream down). The only error the mesh retries."""

    reason = "UNAVAILABLE"


class StreamShutdown(Unavailable):
    """How every server stream ends when the server stops: UNAVAILABLE, not OK (OK would mean "the
    stream is complete", e.g. an order is final), so the client resumes, on another replica, from the
    last sequence it saw. Raised by the use case when `stopping` ends its subscription."""

    reason = "SHUTTING_DOWN"
    MESSAGE = "server shutting down; resume with after_sequence"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class DeadlineExceeded(DomainError):
    reason = "DEADLINE_EXCEEDED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


@dataclass
class Violations:
    """Collects every bad field of a request, so the client learns all of them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

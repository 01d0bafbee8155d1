"""The one place that turns domain errors into gRPC statuses with google.rpc details."""

from __future__ import annotations

from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shop_mesh.services.common import errors

# ErrorInfo.domain: who produced the error (AIP-193).
ERROR_DOMAIN = "shop.example.com"

_CODES: dict[type[errors.DomainError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.Aborted: code_pb2.ABORTED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
    errors.DeadlineExceeded: code_pb2.DEADLINE_EXCEEDED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# Caps on every text that goes into a status. Messages may quote client input (a field mask path, a
# currency code); the status travels in trailers, which clients cap at 8-16 KB, so an unbounded echo
# turned a client's INVALID_ARGUMENT into RESOURCE_EXHAUSTED. Enforced here, once, for every error.
MAX_MESSAGE = 256
MAX_FIELD = 128
MAX_DESCRIPTION = 256
MAX_METADATA_VALUE = 128
MAX_VIOLATIONS = 20
# All violations together: the encoded status stays far below the 8 KB clients accept by default.
MAX_VIOLATION_TEXT = 3_000


def bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def domain_error_status(err: errors.DomainError) -> grpc.Status:
    code = next((c for cls, c in _CODES.items() if isinstance(err, cls)), code_pb2.INTERNAL)
    metadata = {bounded(k, MAX_FIELD): bounded(v, MAX_METADATA_VALUE) for k, v in err.metadata.items()}
    details = [_pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata))]
    message = err.message
    if isinstance(err, errors.InvalidArgument):
        shown: list[error_details_pb2.BadRequest.FieldViolation] = []
        budget = MAX_VIOLATION_TEXT
        for v in err.violations[:MAX_VIOLATIONS]:
            field, description = bounded(v.field, MAX_FIELD), bounded(v.description, MAX_DESCRIPTION)
            budget -= len(field) + len(description)
            if budget < 0:
                break
            shown.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
        if len(err.violations) > len(shown):
            note = f" ({len(shown)} of {len(err.violations)} violations shown)"
            message = bounded(message, MAX_MESSAGE - len(note)) + note
        details.append(_pack(error_details_pb2.BadRequest(field_violations=shown)))
    status = status_pb2.Status(code=code, message=bounded(message, MAX_MESSAGE), details=details)
    return cast(grpc.Status, rpc_status.to_status(status))


def plain_status(code: int, message: str, reason: str) -> grpc.Status:
    """A status for faults that are not domain errors (internal, database down, shutting down)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    return cast(
        grpc.Status,
        rpc_status.to_status(
            status_pb2.Status(code=code, message=bounded(message, MAX_MESSAGE), details=[_pack(info)])
        ),
    )

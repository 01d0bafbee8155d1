"""The one place that turns domain errors into gRPC statuses with google.rpc details."""

from __future__ import annotations

from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors

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


def domain_error_status(err: errors.DomainError) -> grpc.Status:
    code = next((c for cls, c in _CODES.items() if isinstance(err, cls)), code_pb2.INTERNAL)
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))
    ]
    if isinstance(err, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in err.violations
                    ]
                )
            )
        )
    return cast(
        grpc.Status, rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=details))
    )


def plain_status(code: int, message: str, reason: str) -> grpc.Status:
    """A status for faults that are not domain errors (internal, database down, shutting down)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    return cast(
        grpc.Status,
        rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[_pack(info)])),
    )

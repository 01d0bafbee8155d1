"""What the contracts (the generated protobuf descriptors) say about each RPC: that it exists, whether
it streams, and whether the mesh may retry it (protobuf's own `option idempotency_level`).

The topology only adds deployment facts (callers, timeouts, tuning); the set of methods and their retry
class come from here, so a new RPC or a changed idempotency level cannot drift from the mesh.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Literal

from google.protobuf import descriptor, descriptor_pb2

RetryClass = Literal["none", "read", "idempotent"]

_LEVELS = descriptor_pb2.MethodOptions.IdempotencyLevel
# NO_SIDE_EFFECTS: a read, safe to repeat. IDEMPOTENT: a mutation keyed by request_id, safe to repeat.
# IDEMPOTENCY_UNKNOWN (the option left out): never retried by the mesh.
RETRY_CLASS_BY_LEVEL: dict[int, RetryClass] = {
    _LEVELS.Value("NO_SIDE_EFFECTS"): "read",
    _LEVELS.Value("IDEMPOTENT"): "idempotent",
    _LEVELS.Value("IDEMPOTENCY_UNKNOWN"): "none",
}


@dataclass(frozen=True)
class ContractMethod:
    name: str
    streaming: bool  # server- or client-streaming: no route timeout, a stream budget
    retry: RetryClass


def retry_class(method: descriptor.MethodDescriptor) -> RetryClass:
    return RETRY_CLASS_BY_LEVEL[method.GetOptions().idempotency_level]


def from_descriptor(service: descriptor.ServiceDescriptor) -> dict[str, ContractMethod]:
    return {
        m.name: ContractMethod(
            name=m.name, streaming=m.server_streaming or m.client_streaming, retry=retry_class(m)
        )
        for m in service.methods
    }


def service_descriptor(full_name: str) -> descriptor.ServiceDescriptor:
    """The descriptor of `shop.user.v1.UserService`, found in the generated `shop.user.v1.*_pb2` modules."""
    package, _, short = full_name.rpartition(".")
    try:
        pkg = importlib.import_module(package)
    except ImportError as exc:
        raise ValueError(f"{full_name}: no generated package {package!r} (run `make protos`)") from exc
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        found = module.DESCRIPTOR.services_by_name.get(short)
        if found is not None:
            return found  # type: ignore[no-any-return]
    raise ValueError(f"{full_name}: no such service in the generated {package} modules")


def methods(full_name: str) -> dict[str, ContractMethod]:
    """{method name: what its contract says} for one gRPC service."""
    return from_descriptor(service_descriptor(full_name))

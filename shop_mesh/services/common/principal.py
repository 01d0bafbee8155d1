"""Who a call acts for, as the domain sees it: a plain dataclass (no gRPC, no headers).

The edge verifies the end user's JWT and sets `x-shop-user-id` / `x-shop-roles` from its claims; the
sidecars accept those headers only from mesh identities allowed to assert them (shop_mesh/mesh/topology.yaml,
`auth.asserters`). A call that carries no identity headers at all comes from inside the mesh (a
service acting on its own: order's settlement consumer, its reconciler, tests calling an app
directly) and gets the `SERVICE` principal: the rights the topology's RBAC gave that caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from shop_mesh.services.common.errors import NotFound, PermissionDenied

# Set by the edge from the verified JWT (sub, roles); passed on by order when it acts for a customer.
USER_ID_HEADER = "x-shop-user-id"
ROLES_HEADER = "x-shop-roles"
IDENTITY_HEADERS = (USER_ID_HEADER, ROLES_HEADER)

ROLE_CUSTOMER = "customer"
ROLE_ADMIN = "admin"


class Kind(Enum):
    SERVICE = "service"  # no end user: a mesh service acting on its own
    ADMIN = "admin"  # an operator (role `admin`)
    CUSTOMER = "customer"  # an end user, owner of the records whose user_id is theirs


@dataclass(frozen=True)
class Principal:
    kind: Kind
    user_id: str = ""
    roles: frozenset[str] = frozenset()

    @property
    def privileged(self) -> bool:
        """Admins and services see and change every record; customers only their own."""
        return self.kind is not Kind.CUSTOMER

    def owns(self, user_id: str) -> bool:
        """May act on records of `user_id` (its own, or every one for admins and services)."""
        return self.privileged or (bool(self.user_id) and self.user_id == user_id)

    def require_privileged(self, what: str) -> None:
        """Operations for admins and services only (list every user, watch every payment, ...)."""
        if not self.privileged:
            raise PermissionDenied(f"{what} is for administrators", reason="ADMIN_ONLY")

    def check_owner(self, owner_id: str, not_found: Callable[[str], NotFound]) -> None:
        """Another customer's record looks exactly like a missing one: ids cannot be probed.
        `not_found(owner_id)` builds the error only when it is raised (GetUser's hot path)."""
        if not self.owns(owner_id):
            raise not_found(owner_id)


SERVICE = Principal(Kind.SERVICE)


def customer(user_id: str) -> Principal:
    return Principal(Kind.CUSTOMER, user_id, frozenset({ROLE_CUSTOMER}))


def admin(user_id: str = "") -> Principal:
    return Principal(Kind.ADMIN, user_id, frozenset({ROLE_ADMIN}))


def from_headers(user_id: str | None, roles: str | None) -> Principal:
    """The principal of the identity headers (None = header absent). No headers: SERVICE.

    Any identity header makes the call an end user's: roles without `admin` (or none at all) are a
    customer, limited to `user_id` (an empty one owns nothing), never a service.
    """
    if user_id is None and roles is None:
        return SERVICE
    # "customer,admin" or, as the edge copies the JWT's list claim, '["customer","admin"]'.
    role_set = frozenset(r.strip(' "[]') for r in (roles or "").split(",")) - {""}
    kind = Kind.ADMIN if ROLE_ADMIN in role_set else Kind.CUSTOMER
    return Principal(kind, (user_id or "").strip(), role_set)


def to_headers(principal: Principal) -> list[tuple[str, str]]:
    """The identity headers that carry `principal` on an outgoing call (none for SERVICE)."""
    if principal.kind is Kind.SERVICE:
        return []
    return [(USER_ID_HEADER, principal.user_id), (ROLES_HEADER, ",".join(sorted(principal.roles)))]

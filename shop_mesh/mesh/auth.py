"""End-user authentication policy of the mesh: the topology's `auth:` section.

Read by the renderers (shop_mesh/mesh/render_auth.py: the edge's jwt_authn + RBAC, the sidecars'
identity-header
check) and by `python -m shop_mesh.mesh token` (shop_mesh/mesh/tokens.py). No Envoy config here, only the
decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Served by every app and public at the edge: probes, `grpcurl list/describe`.
ALWAYS_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class IssuerSettings:
    """Who issues the tokens the edge accepts, and where its public keys are."""

    issuer: str
    audience: str
    # Remote JWKS (Kubernetes: the identity provider's); None = the local dev JWKS file.
    jwks_uri: str | None = None
    jwks_cache_s: float = 600.0
    # The claim holding the roles (a list of strings); dotted for nested claims (`realm_access.roles`).
    roles_claim: str = "roles"


@dataclass(frozen=True)
class AuthPolicy:
    local: IssuerSettings = field(
        default_factory=lambda: IssuerSettings("https://auth.shop.local/dev", "shop-mesh")
    )
    k8s: IssuerSettings = field(
        default_factory=lambda: IssuerSettings(
            "https://keycloak.example.com/realms/shop",
            "shop-mesh",
            "https://keycloak.example.com/realms/shop/protocol/openid-connect/certs",
            roles_claim="realm_access.roles",
        )
    )
    # gRPC paths reachable without a token (besides health and reflection): sign-up.
    public: tuple[str, ...] = ("/shop.user.v1.UserService/CreateUser",)
    # gRPC paths the edge lets through only for tokens with the `admin` role.
    admin_only: tuple[str, ...] = ("/shop.user.v1.UserService/ListUsers",)
    admin_role: str = "admin"
    # Headers the edge sets from the verified claims (and strips from clients).
    user_id_header: str = "x-shop-user-id"
    roles_header: str = "x-shop-roles"
    # Mesh identities whose calls may carry those headers; from any other the sidecar refuses the call.
    asserters: tuple[str, ...] = ("edge", "order")

    @property
    def identity_headers(self) -> tuple[str, str]:
        return (self.user_id_header, self.roles_header)


def _path(method: str) -> str:
    """`shop.user.v1.UserService/CreateUser` or `/shop...` -> `/shop.user.v1.UserService/CreateUser`."""
    return method if method.startswith("/") else f"/{method}"


def _duration_s(value: Any, default: float) -> float:
    if value is None:
        return default
    text = str(value).strip()
    return float(text[:-1]) if text.endswith("s") else float(text)


def _issuer(raw: dict[str, Any], default: IssuerSettings) -> IssuerSettings:
    return IssuerSettings(
        issuer=str(raw.get("issuer", default.issuer)),
        audience=str(raw.get("audience", default.audience)),
        jwks_uri=raw.get("jwks_uri", default.jwks_uri),
        jwks_cache_s=_duration_s(raw.get("jwks_cache"), default.jwks_cache_s),
        roles_claim=str(raw.get("roles_claim", default.roles_claim)),
    )


def auth_policy(raw: dict[str, Any] | None) -> AuthPolicy:
    raw = raw or {}
    d = AuthPolicy()
    policy = AuthPolicy(
        local=_issuer(raw.get("local", {}), d.local),
        k8s=_issuer(raw.get("k8s", {}), d.k8s),
        public=tuple(_path(m) for m in raw.get("public", d.public)),
        admin_only=tuple(_path(m) for m in raw.get("admin_only", d.admin_only)),
        admin_role=str(raw.get("admin_role", d.admin_role)),
        user_id_header=str(raw.get("user_id_header", d.user_id_header)).lower(),
        roles_header=str(raw.get("roles_header", d.roles_header)).lower(),
        asserters=tuple(raw.get("asserters", d.asserters)),
    )
    if policy.local.jwks_uri is not None:
        raise ValueError("auth.local: the local mesh verifies with its dev JWKS file; no jwks_uri")
    if policy.k8s.jwks_uri is None:
        raise ValueError("auth.k8s.jwks_uri: the identity provider's JWKS URL is required")
    return policy

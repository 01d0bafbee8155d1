"""The Envoy pieces of end-user authentication, as plain dicts (inserted by shop_mesh/mesh/render.py and
k8s/render.py; decisions in shop_mesh/mesh/auth.py and docs/decisions.md).

Edge, in filter order:
1. `header_mutation` strips client-sent identity headers (x-shop-user-id, x-shop-roles): only the
   verified token may set them.
2. `jwt_authn` verifies the bearer token (signature against the JWKS, `iss`, `aud`, `exp`, `nbf`; the
   algorithm must match the key, so `alg: none` and HS256-with-the-public-key fail) on every route but
   the public ones, sets the identity headers from the claims (`claim_to_headers`), keeps the payload
   in dynamic metadata for RBAC and drops the Authorization header (the apps never see tokens);
   a second `header_mutation` copies the roles claim (a list) from that metadata into x-shop-roles.
   A failure is a local reply 401, which Envoy turns into grpc-status 16 UNAUTHENTICATED for gRPC.
3. `rbac` (DENY): admin-only methods without the admin role, and verified tokens without `sub`
   (a token that names nobody must not look like an in-mesh service call), get PERMISSION_DENIED.

Sidecars: an `rbac` DENY filter refuses calls carrying identity headers from any mesh identity not
in `auth.asserters` (PERMISSION_DENIED): only the edge, and order acting for a customer, assert users.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from shop_mesh.mesh.auth import ALWAYS_PUBLIC_PREFIXES, IssuerSettings
from shop_mesh.mesh.topology import Topology

Config = dict[str, Any]

PROVIDER = "shop"
JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "jwt_payload"
JWKS_CLUSTER = "jwks_idp"
# Trust store of the remote JWKS fetch: the CA bundle of the Envoy image (distroless ships it).
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _t(name: str) -> str:
    return f"type.googleapis.com/{name}"


def _is_prefix(path: str) -> bool:
    return path.endswith(("/", "."))


def _path_matcher(path: str) -> Config:
    if _is_prefix(path):
        return {"url_path": {"path": {"prefix": path}}}
    return {"url_path": {"path": {"exact": path}}}


def _public_paths(topo: Topology) -> list[str]:
    return [*ALWAYS_PUBLIC_PREFIXES, *topo.auth.public]


def strip_identity_headers(topo: Topology) -> Config:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _t("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {"request_mutations": [{"remove": h} for h in topo.auth.identity_headers]},
        },
    }


def _jwks_source(settings: IssuerSettings, jwks_file: str | None) -> Config:
    if jwks_file is not None:
        return {"local_jwks": {"filename": jwks_file}}
    assert settings.jwks_uri is not None
    return {
        "remote_jwks": {
            "http_uri": {"uri": settings.jwks_uri, "cluster": JWKS_CLUSTER, "timeout": "5s"},
            "cache_duration": f"{int(settings.jwks_cache_s)}s",
            # Fetched when the listener starts (not on the first request), refreshed before expiry.
            "async_fetch": {},
            "retry_policy": {"num_retries": 3},
        }
    }


def jwt_authn(topo: Topology, settings: IssuerSettings, jwks_file: str | None) -> Config:
    """`jwks_file`: the local dev JWKS; None: the identity provider's remote JWKS (Kubernetes)."""
    auth = topo.auth
    provider: Config = {
        "issuer": settings.issuer,
        "audiences": [settings.audience],
        **_jwks_source(settings, jwks_file),
        "forward": False,  # the Authorization header stops here
        # Verified tokens are cached (a client reuses its token): no signature check per call; a
        # cached token is still checked for expiry on every use.
        "jwt_cache_config": {"jwt_cache_size": 1000},
        "payload_in_metadata": PAYLOAD_KEY,
        # Strings only: the roles (a list claim) are copied by roles_to_header() below.
        "claim_to_headers": [{"header_name": auth.user_id_header, "claim_name": "sub"}],
    }
    rules: list[Config] = []
    for path in _public_paths(topo):
        match = {"prefix": path} if _is_prefix(path) else {"path": path}
        # Public, but a token that is sent must still be valid (and then names its user).
        rules.append(
            {
                "match": match,
                "requires": {
                    "requires_any": {"requirements": [{"provider_name": PROVIDER}, {"allow_missing": {}}]}
                },
            }
        )
    rules.append({"match": {"prefix": "/"}, "requires": {"provider_name": PROVIDER}})
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": _t("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"),
            "providers": {PROVIDER: provider},
            "rules": rules,
        },
    }


def roles_to_header(topo: Topology, settings: IssuerSettings) -> Config:
    """The verified roles claim into x-shop-roles (as JSON, e.g. `["customer"]`): claim_to_headers
    copies string claims only, and roles are a list (nested in some IdPs' tokens)."""
    path = ":".join([JWT_FILTER, PAYLOAD_KEY, *settings.roles_claim.split(".")])
    return {
        "name": "shop.roles_to_header",
        "typed_config": {
            "@type": _t("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {
                "request_mutations": [
                    {
                        "append": {
                            "header": {"key": topo.auth.roles_header, "value": f"%DYNAMIC_METADATA({path})%"},
                            # No token (a public method): no header, not an empty one.
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ]
            },
        },
    }


def _payload_matcher(claim: str, value: Config) -> Config:
    path = [{"key": PAYLOAD_KEY}, *({"key": part} for part in claim.split("."))]
    return {"metadata": {"filter": JWT_FILTER, "path": path, "value": value}}


def edge_rbac(topo: Topology, settings: IssuerSettings) -> Config:
    auth = topo.auth
    has_admin_role = _payload_matcher(
        settings.roles_claim, {"list_match": {"one_of": {"string_match": {"exact": auth.admin_role}}}}
    )
    has_subject = _payload_matcher("sub", {"present_match": True})
    policies: Config = {
        "subject-required": {
            "permissions": [
                {"not_rule": {"or_rules": {"rules": [_path_matcher(p) for p in _public_paths(topo)]}}}
            ],
            "principals": [{"not_id": has_subject}],
        }
    }
    if auth.admin_only:
        policies["admin-only"] = {
            "permissions": [{"or_rules": {"rules": [_path_matcher(p) for p in auth.admin_only]}}],
            "principals": [{"not_id": has_admin_role}],
        }
    return {
        "name": "shop.edge_auth_rbac",
        "typed_config": {
            "@type": _t("envoy.extensions.filters.http.rbac.v3.RBAC"),
            "rules": {"action": "DENY", "policies": policies},
            "rules_stat_prefix": "edge_auth_",
        },
    }


def edge_filters(topo: Topology, jwks_file: str | None) -> list[Config]:
    """The edge's authentication filters, to run before routing (and before rate limiting)."""
    settings = topo.auth.local if jwks_file is not None else topo.auth.k8s
    return [
        strip_identity_headers(topo),
        jwt_authn(topo, settings, jwks_file),
        roles_to_header(topo, settings),
        edge_rbac(topo, settings),
    ]


def local_reply_mappers() -> list[Config]:
    """The edge's local replies: every token failure is UNAUTHENTICATED.

    jwt_authn answers 401 for most failures but 403 for a token whose audience is not ours; for gRPC
    Envoy derives grpc-status from that code (401 -> 16, 403 -> 7). A 403 after a verified token (the
    payload is in the metadata: the role RBAC denied it) stays PERMISSION_DENIED; any other 403 is a
    rejected token and becomes 401 -> UNAUTHENTICATED. The first matching mapper applies.
    """
    verified = {
        "metadata_filter": {
            "matcher": {
                "filter": JWT_FILTER,
                "path": [{"key": PAYLOAD_KEY}, {"key": "iss"}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,
        }
    }
    forbidden = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 403, "runtime_key": "edge_auth_403"}}
        }
    }
    return [
        {"filter": {"and_filter": {"filters": [forbidden, verified]}}},  # unchanged: a role decision
        {"filter": forbidden, "status_code": 401},
    ]


def jwks_endpoint(topo: Topology) -> tuple[str, int, bool]:
    """(host, port, TLS) of the identity provider's JWKS URL (auth.k8s.jwks_uri)."""
    uri = topo.auth.k8s.jwks_uri
    assert uri is not None
    parts = urlsplit(uri)
    tls = parts.scheme == "https"
    return parts.hostname or "", parts.port or (443 if tls else 80), tls


def jwks_clusters(topo: Topology, jwks_file: str | None) -> list[Config]:
    """The cluster the edge fetches the remote JWKS through (none with a local JWKS file)."""
    if jwks_file is not None:
        return []
    host, port, tls = jwks_endpoint(topo)
    cluster: Config = {
        "name": JWKS_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _t("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    }
                },
            },
        }
    return [cluster]


def sidecar_asserter_check(topo: Topology) -> Config:
    """Refuse identity headers from mesh identities that may not assert an end user."""
    auth = topo.auth
    return {
        "name": "shop.identity_header_rbac",
        "typed_config": {
            "@type": _t("envoy.extensions.filters.http.rbac.v3.RBAC"),
            "rules_stat_prefix": "identity_headers_",
            "rules": {
                "action": "DENY",
                "policies": {
                    "identity-headers-from-non-asserter": {
                        "permissions": [
                            {
                                "or_rules": {
                                    "rules": [
                                        {"header": {"name": h, "present_match": True}}
                                        for h in auth.identity_headers
                                    ]
                                }
                            }
                        ],
                        "principals": [
                            {
                                "not_id": {
                                    "or_ids": {
                                        "ids": [
                                            {
                                                "authenticated": {
                                                    "principal_name": {"exact": topo.spiffe_id(a)}
                                                }
                                            }
                                            for a in auth.asserters
                                        ]
                                    }
                                }
                            }
                        ],
                    }
                },
            },
        },
    }

"""Dev end-user tokens: an ES256 signing key made next to the dev PKI, its JWKS, and JWTs minted with it.

`.run/pki/jwt/signing.key` (0600, never committed: .run/ is gitignored) and `.run/pki/jwt/jwks.json`
(the public key the local edge's jwt_authn verifies with). `python -m shop_mesh.mesh token --user usr_… |
--admin [--ttl 1h]` prints a token. The product is not an identity provider: in Kubernetes the edge
trusts a real one (topology `auth.k8s`, docs/deploy.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from shop_mesh.mesh.auth import IssuerSettings
from shop_mesh.mesh.pki import _write_private

ALGORITHM = "ES256"
KEY_FILE = "signing.key"
JWKS_FILE = "jwks.json"
DEFAULT_TTL_S = 3600.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    # kid = RFC 7638 thumbprint: stable for the key, so a token names the key that signed it.
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return {
        **jwk,
        "kid": _b64url(hashlib.sha256(canonical.encode()).digest()),
        "use": "sig",
        "alg": ALGORITHM,
    }


def ensure_signing_key(key_dir: Path) -> ec.EllipticCurvePrivateKey:
    """Load the dev signing key, or create it (and its JWKS) on first use."""
    key_path, jwks_path = key_dir / KEY_FILE, key_dir / JWKS_FILE
    if key_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        key_dir.mkdir(parents=True, exist_ok=True)
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    if not jwks_path.exists():
        jwks_path.write_text(json.dumps({"keys": [public_jwk(key)]}, indent=2) + "\n")
    return key


def claims(
    settings: IssuerSettings,
    subject: str,
    roles: Sequence[str],
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
) -> dict[str, Any]:
    issued = int(time.time() if now is None else now)
    return {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "roles": list(roles),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
    }


def sign(key: ec.EllipticCurvePrivateKey, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"kid": public_jwk(key)["kid"]})


def mint(
    key_dir: Path,
    settings: IssuerSettings,
    subject: str,
    roles: Sequence[str],
    ttl_s: float = DEFAULT_TTL_S,
) -> str:
    return sign(ensure_signing_key(key_dir), claims(settings, subject, roles, ttl_s))


def parse_ttl(text: str) -> float:
    """`90s`, `30m`, `1h`, `2d` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)

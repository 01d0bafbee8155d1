"""Dev end-user tokens (shop_mesh/mesh/tokens.py): what `python -m shop_mesh.mesh token` prints verifies
against the JWKS
the local edge reads, with the claims the edge checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest

from shop_mesh.mesh import tokens
from shop_mesh.mesh.auth import IssuerSettings

SETTINGS = IssuerSettings("https://auth.shop.local/dev", "shop-mesh")


def test_a_minted_token_verifies_with_the_jwks_and_carries_the_claims(tmp_path: Path) -> None:
    token = tokens.mint(tmp_path, SETTINGS, "usr_ada", ["customer"], ttl_s=600)
    jwks = jwt.PyJWKSet.from_dict(json.loads((tmp_path / tokens.JWKS_FILE).read_text()))
    assert jwt.get_unverified_header(token)["kid"] == jwks.keys[0].key_id
    claims = jwt.decode(
        token, jwks.keys[0].key, algorithms=["ES256"], audience="shop-mesh", issuer=SETTINGS.issuer
    )
    assert claims["sub"] == "usr_ada" and claims["roles"] == ["customer"]
    assert claims["nbf"] == claims["iat"] and claims["exp"] - claims["iat"] == 600
    assert abs(claims["iat"] - time.time()) < 60


def test_the_signing_key_is_private_and_kept_across_calls(tmp_path: Path) -> None:
    first = tokens.ensure_signing_key(tmp_path)
    jwks = (tmp_path / tokens.JWKS_FILE).read_text()
    assert (tmp_path / tokens.KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = tokens.ensure_signing_key(tmp_path)
    assert tokens.public_jwk(again) == tokens.public_jwk(first)
    assert (tmp_path / tokens.JWKS_FILE).read_text() == jwks
    assert "d" not in json.loads(jwks)["keys"][0]  # the public half only


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("45", 45)]
)
def test_ttl_forms(text: str, seconds: float) -> None:
    assert tokens.parse_ttl(text) == seconds

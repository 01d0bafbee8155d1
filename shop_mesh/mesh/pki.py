"""Dev PKI: a throwaway local CA and short-lived SPIFFE leaf certificates, one per mesh identity.

Layout per identity mirrors a Kubernetes secret volume, so the same Envoy SDS config rotates in both
places: `<dir>/..<stamp>/{tls.crt,tls.key,ca.crt}`, a `..data` symlink to the current stamp, and
top-level `tls.crt -> ..data/tls.crt` etc. A rotation writes a new stamp directory and swaps `..data`
with one atomic rename; Envoy watches the directory (watched_directory) and reloads the pair.
Nothing here is ever committed (.run/ is gitignored).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_TTL = dt.timedelta(days=30)
LEAF_TTL = dt.timedelta(hours=24)
# Renew when less than this share of the lifetime is left.
RENEW_FRACTION = 1 / 3
FILES = ("tls.crt", "tls.key", "ca.crt")


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Leaf:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ca(common_name: str = "shop-mesh dev CA", ttl: dt.timedelta = CA_TTL) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    ca: Authority,
    spiffe_id: str,
    dns_names: tuple[str, ...] = (),
    ttl: dt.timedelta = LEAF_TTL,
) -> Leaf:
    """A leaf for one workload identity: URI SAN = SPIFFE id (what RBAC matches), client+server auth."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(d) for d in dns_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.rsplit("/", 1)[-1])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Leaf(cert.public_bytes(serialization.Encoding.PEM), key_pem, ca.cert_pem)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def save_ca(ca: Authority, ca_dir: Path) -> None:
    ca_dir.mkdir(parents=True, exist_ok=True)
    _write_private(
        ca_dir / "ca.key",
        ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    (ca_dir / "ca.crt").write_bytes(ca.cert_pem)


def load_or_create_ca(ca_dir: Path) -> Authority:
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        # A CA close to expiry is replaced (and every leaf with it) rather than nursed along.
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc - _now() > LEAF_TTL:
            return Authority(cert, key)
    ca = new_ca()
    save_ca(ca, ca_dir)
    return ca


def install(leaf: Leaf, identity_dir: Path) -> None:
    """Publish a leaf atomically: new stamp dir, then one rename of the `..data` symlink."""
    identity_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"..{time.strftime('%Y%m%dT%H%M%S')}_{time.monotonic_ns()}"
    target = identity_dir / stamp
    target.mkdir()
    (target / "tls.crt").write_bytes(leaf.cert_pem)
    _write_private(target / "tls.key", leaf.key_pem)
    (target / "ca.crt").write_bytes(leaf.ca_pem)
    tmp_link = identity_dir / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    old = os.readlink(identity_dir / "..data") if (identity_dir / "..data").is_symlink() else None
    os.symlink(stamp, tmp_link)
    os.replace(tmp_link, identity_dir / "..data")
    for name in FILES:
        link = identity_dir / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    # Keep the previous generation: an Envoy mid-read of the old pair must not see files vanish.
    for entry in identity_dir.iterdir():
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and entry.name.startswith("..")
            and entry.name
            not in (
                stamp,
                old,
            )
        ):
            shutil.rmtree(entry, ignore_errors=True)


def remaining_fraction(identity_dir: Path) -> float:
    """Share of the current leaf's lifetime still left (0 when missing or unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate((identity_dir / "tls.crt").read_bytes())
    except (OSError, ValueError):
        return 0.0
    total = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    left = (cert.not_valid_after_utc - _now()).total_seconds()
    return max(0.0, left / total) if total > 0 else 0.0


def serial(identity_dir: Path) -> int:
    return x509.load_pem_x509_certificate((identity_dir / "tls.crt").read_bytes()).serial_number


def ensure_identities(
    pki_dir: Path,
    spiffe_ids: dict[str, str],
    *,
    force: bool = False,
    ttl: dt.timedelta = LEAF_TTL,
) -> list[str]:
    """Create the CA if needed and (re)issue every identity whose leaf is missing, stale or forced.

    Returns the identities that got a new leaf.
    """
    ca = load_or_create_ca(pki_dir / "ca")
    renewed = []
    for identity, spiffe_id in spiffe_ids.items():
        identity_dir = pki_dir / identity
        current_ca = (identity_dir / "ca.crt").read_bytes() if (identity_dir / "ca.crt").exists() else b""
        stale = remaining_fraction(identity_dir) < RENEW_FRACTION or current_ca != ca.cert_pem
        if force or stale:
            install(issue(ca, spiffe_id, dns_names=(f"{identity}.mesh.local",), ttl=ttl), identity_dir)
            renewed.append(identity)
    return renewed

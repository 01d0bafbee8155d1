"""The dev PKI: SPIFFE leaves from a local CA, atomic k8s-style publication, renewal before expiry."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509

from shop_mesh.mesh import pki

IDS = {"order": "spiffe://shop.local/ns/shop/sa/order", "edge": "spiffe://shop.local/ns/shop/sa/edge"}


def test_first_run_creates_ca_and_spiffe_leaves(tmp_path: Path) -> None:
    assert sorted(pki.ensure_identities(tmp_path, IDS)) == ["edge", "order"]
    cert = x509.load_pem_x509_certificate((tmp_path / "order" / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [IDS["order"]]
    assert (tmp_path / "order" / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    assert os.stat(tmp_path / "order" / "tls.key").st_mode & 0o077 == 0  # private key not world-readable
    # The files are reached through the ..data symlink, like a Kubernetes secret volume.
    assert os.readlink(tmp_path / "order" / "tls.crt") == "..data/tls.crt"
    # A second run reuses what is still fresh.
    assert pki.ensure_identities(tmp_path, IDS) == []


def test_rotation_swaps_the_pair_atomically_and_keeps_the_ca(tmp_path: Path) -> None:
    pki.ensure_identities(tmp_path, IDS)
    before, ca_before = pki.serial(tmp_path / "order"), (tmp_path / "ca" / "ca.crt").read_bytes()
    assert sorted(pki.ensure_identities(tmp_path, IDS, force=True)) == ["edge", "order"]
    assert pki.serial(tmp_path / "order") != before
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == ca_before
    stamps = [p for p in (tmp_path / "order").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(stamps) <= 2  # the current and the previous generation only


def test_leaves_close_to_expiry_are_renewed(tmp_path: Path) -> None:
    pki.ensure_identities(tmp_path, IDS, ttl=dt.timedelta(minutes=1))
    assert pki.remaining_fraction(tmp_path / "order") < pki.RENEW_FRACTION
    assert sorted(pki.ensure_identities(tmp_path, IDS)) == ["edge", "order"]
    assert pki.remaining_fraction(tmp_path / "order") > 0.9

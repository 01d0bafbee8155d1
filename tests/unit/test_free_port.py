"""The one port allocator: ports outside the kernel's ephemeral range (where any outgoing connection
may take a port between the pick and the server's bind), never the same twice, disjoint per worker."""

from __future__ import annotations

import socket

import pytest

from shop_mesh.mesh import local


def test_ports_are_outside_the_ephemeral_range_and_never_repeat() -> None:
    low, high = local._ephemeral_range()
    ports = [local.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports)
    with socket.socket() as sock:  # and a server can bind what it was given
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_reserved_or_bound_port_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_port_pool", lambda: range(40_000, 40_003))
    monkeypatch.setattr(local, "_taken", set())
    local.reserve_port(40_000)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 40_001))
        listener.listen()
        assert local.free_port() == 40_002
        with pytest.raises(RuntimeError, match="no free port"):
            local.free_port()


def test_xdist_workers_pick_from_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    shares = []
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        shares.append(set(local._port_pool()))
    assert all(len(share) >= 1_000 for share in shares)
    assert all(a.isdisjoint(b) for i, a in enumerate(shares) for b in shares[i + 1 :])

"""The one idempotent-command helper and the one paging rule, against in-memory fakes: no database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from shop_mesh.services.common.errors import AlreadyExists, Unavailable
from shop_mesh.services.common.idempotency import Codec, IdempotentCommands, fingerprint
from shop_mesh.services.common.pagination import Page, PageRequest, page_of
from shop_mesh.services.common.unit_of_work import Session
from tests.unit.fake_keys import InMemoryKeys


@dataclass
class Unit:
    """What a unit yields: a key table and an effect log, published on commit only."""

    keys: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)
    effects: list[str] = field(default_factory=list)


class Units:
    def __init__(self) -> None:
        self.committed = Unit()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Unit]:
        yield Unit(dict(self.committed.keys), list(self.committed.effects))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Unit]:
        staged = Unit(dict(self.committed.keys), list(self.committed.effects))
        yield staged
        self.committed = staged


def _unit(session: Session) -> Unit:
    assert isinstance(session, Unit)
    return session


def _keys() -> InMemoryKeys:
    return InMemoryKeys(lambda session: _unit(session).keys)


TEXT: Codec[str] = Codec(lambda s: s.upper(), lambda s: s.lower())


@pytest.fixture
def units() -> Units:
    return Units()


@pytest.fixture
def commands(units: Units) -> IdempotentCommands[Unit]:
    return IdempotentCommands(units, _keys())


async def _charge(unit: Unit) -> str:
    unit.effects.append("charged")
    return "receipt"


async def test_a_repeat_replays_the_stored_result_without_a_second_effect(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    first = await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    assert (first.result, first.replayed) == ("receipt", False)
    again = await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    # The stored (encoded) result decoded: what the first request answered, not a re-run.
    assert (again.result, again.replayed) == ("receipt", True)
    assert units.committed.effects == ["charged"]
    assert units.committed.keys[("Charge", "r1")][1] == "RECEIPT"


async def test_a_different_payload_under_a_used_id_is_refused(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    with pytest.raises(AlreadyExists) as err:
        await commands.run("Charge", "r1", {"amount": 6}, TEXT, _charge)
    assert err.value.reason == "REQUEST_ID_REUSED" and "Charge" in err.value.message
    # The same id in another scope is another request.
    assert not (await commands.run("Refund", "r1", {"amount": 6}, TEXT, _charge)).replayed
    assert units.committed.effects == ["charged", "charged"]


async def test_a_failing_body_leaves_neither_effect_nor_key(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    async def refuse(unit: Unit) -> str:
        unit.effects.append("half done")
        raise Unavailable("upstream down")

    with pytest.raises(Unavailable):
        await commands.run("Charge", "r1", {"amount": 5}, TEXT, refuse)
    assert units.committed == Unit()
    # The id is free again: a retry runs the body.
    assert not (await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)).replayed


async def test_last_runs_after_the_key_is_stored_and_not_on_a_replay(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    seen: list[tuple[str, str | None]] = []

    async def last(unit: Unit, result: str) -> None:
        seen.append(unit.keys[("Charge", "r1")])
        unit.effects.append(f"event for {result}")

    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge, last=last)
    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge, last=last)
    assert seen == [(seen[0][0], "RECEIPT")]
    assert units.committed.effects == ["charged", "event for receipt"]


async def test_replayed_peeks_in_a_read_unit_with_the_same_rule(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    async with units.read() as unit:
        assert await commands.replayed(unit, "Charge", "r1", {"amount": 5}, TEXT) is None
    assert units.committed.keys == {}  # a peek claims nothing
    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    async with units.read() as unit:
        assert await commands.replayed(unit, "Charge", "r1", {"amount": 5}, TEXT) == "receipt"
        with pytest.raises(AlreadyExists):
            await commands.replayed(unit, "Charge", "r1", {"amount": 7}, TEXT)


async def test_a_claimed_but_unfinished_id_is_unavailable(units: Units) -> None:
    # Claimed by a transaction still running elsewhere: retryable, never INTERNAL.
    units.committed.keys[("Charge", "r1")] = (fingerprint({"amount": 5}), None)
    with pytest.raises(Unavailable):
        await IdempotentCommands(units, _keys()).run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    assert units.committed.effects == []


def _key(row: str) -> str:
    return row


@pytest.mark.parametrize(
    ("rows", "size", "page"),
    [
        (["a", "b", "c"], 2, Page(["a", "b"], "b")),  # size+1 fetched: another page follows
        (["a", "b"], 2, Page(["a", "b"], None)),  # exactly a page: the last one
        (["a"], 2, Page(["a"], None)),
        ([], 2, Page([], None)),
    ],
)
def test_the_paging_rule_trims_and_keys_the_next_page(rows: list[str], size: int, page: Page[str]) -> None:
    request = PageRequest(size, None)
    assert request.fetch_size == size + 1
    assert page_of(rows, request, _key) == page

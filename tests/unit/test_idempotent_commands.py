"""The one idempotent-command helper and the one paging rule, against in-memory fakes: no database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from shop_mesh.services.common.errors import AlreadyExists, Unavailable
from shop_mesh.services.common.idempotency import Codec, IdempotentCommands, fingerprint
from shop_mesh.services.common.pagination import Page, PageRequest, page_of
from tests.unit.fakes.units import FakeSession, InMemoryKeys, InMemoryUnits, Tables


@dataclass
class ChargeTables(Tables):
    effects: list[str] = field(default_factory=list)  # what the bodies did, published on commit only


# The unit hands its function its session, whose tables the test reads and writes directly.
Unit = FakeSession[ChargeTables]
Units = InMemoryUnits[ChargeTables, Unit]


def _the_session(session: Unit) -> Unit:
    return session


def _keys() -> InMemoryKeys:
    return InMemoryKeys()


TEXT: Codec[str] = Codec(lambda s: s.upper(), lambda s: s.lower())


@pytest.fixture
def units() -> Units:
    return InMemoryUnits(ChargeTables(), _the_session)


@pytest.fixture
def commands(units: Units) -> IdempotentCommands[Unit]:
    return IdempotentCommands(units, _keys())


def _charge(unit: Unit) -> str:
    unit.tables.effects.append("charged")
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
    def refuse(unit: Unit) -> str:
        unit.tables.effects.append("half done")
        raise Unavailable("upstream down")

    with pytest.raises(Unavailable):
        await commands.run("Charge", "r1", {"amount": 5}, TEXT, refuse)
    assert units.committed == ChargeTables()
    # The id is free again: a retry runs the body.
    assert not (await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)).replayed


async def test_last_runs_after_the_key_is_stored_and_not_on_a_replay(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    seen: list[tuple[str, str | None]] = []

    def last(unit: Unit, result: str) -> None:
        seen.append(unit.tables.keys[("Charge", "r1")])
        unit.tables.effects.append(f"event for {result}")

    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge, last=last)
    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge, last=last)
    assert seen == [(seen[0][0], "RECEIPT")]
    assert units.committed.effects == ["charged", "event for receipt"]


async def test_replayed_peeks_in_a_read_unit_with_the_same_rule(
    commands: IdempotentCommands[Unit], units: Units
) -> None:
    def peek(amount: int) -> Callable[[Unit], str | None]:
        return lambda unit: commands.replayed(unit, "Charge", "r1", {"amount": amount}, TEXT)

    assert await units.read(peek(5)) is None
    assert units.committed.keys == {}  # a peek claims nothing
    await commands.run("Charge", "r1", {"amount": 5}, TEXT, _charge)
    assert await units.read(peek(5)) == "receipt"
    with pytest.raises(AlreadyExists):
        await units.read(peek(7))


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

"""Resource ids sort by creation, even when many are made in the same millisecond."""

from __future__ import annotations

from shop_mesh.services.common.ids import MonotonicUlid, is_valid_id, new_id


def test_ids_made_in_one_millisecond_sort_by_creation() -> None:
    generator = MonotonicUlid(clock_ms=lambda: 1_700_000_000_000)
    ids = [generator.new() for _ in range(1_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_clock_that_steps_back_does_not_break_the_order() -> None:
    ticks = iter([5_000, 5_000, 4_000, 6_000])
    generator = MonotonicUlid(clock_ms=lambda: next(ticks))
    ids = [generator.new() for _ in range(4)]
    assert ids == sorted(ids)


def test_new_ids_are_valid_and_increasing() -> None:
    ids = [new_id("usr") for _ in range(200)]
    assert ids == sorted(ids)
    assert all(is_valid_id(i, "usr") for i in ids)


def test_id_check_matches_the_whole_string() -> None:
    good = new_id("ord")
    assert is_valid_id(good, "ord")
    assert not is_valid_id(good + "\n", "ord")
    assert not is_valid_id(good, "usr")
    assert not is_valid_id("ord_" + "I" * 26, "ord")

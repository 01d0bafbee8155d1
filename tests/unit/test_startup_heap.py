"""The services' start-up heap is frozen out of the cyclic collector (docs/performance.md: a full
collection under load scanned the whole start-up heap, 70-270 ms per pass)."""

from __future__ import annotations

import gc

from shop_mesh.services.common.server import freeze_startup_heap


def test_startup_objects_leave_the_collectors_view_and_later_garbage_is_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector frees it

    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # the imported modules' objects, at least
        gc.collect()
        frozen = gc.get_freeze_count()
        for _ in range(100):
            Node()
        assert gc.collect() >= 100  # what serving allocates after the freeze is still collected
        assert gc.get_freeze_count() == frozen  # and a full pass did not scan the frozen heap back in
    finally:
        gc.unfreeze()

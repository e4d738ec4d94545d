"""The guest handle manager: real bit layout, typed entries, stale/foreign/wrong-type rejection.

The tables are touched only on the driver's event loop, so they have no locks: these tests drive
them directly, from one thread, as the loop does."""

import random

import pytest

from dxg.guest import handles as guest_handles
from dxg.guest.handles import MIN_FREE_ENTRIES, HandleSpace, HandleTable
from dxg.uapi.handles import (
    HandleType,
    handle_index,
    handle_instance,
    handle_unique,
    make_handle,
)


def split(h: int) -> tuple[int, int, int]:
    return handle_index(h), handle_unique(h), handle_instance(h)


def test_the_guest_types_its_entries_with_the_uapi_enum():
    # One HandleType for the guest, the host and the ABI layer.
    assert guest_handles.HandleType is HandleType
    from dxg.host import handles as host_handles

    assert host_handles.HandleType is HandleType


def test_layout_and_first_generation():
    t = HandleTable(HandleSpace())
    h = t.alloc(HandleType.DEVICE, "dev")
    index, unique, instance = split(h)
    assert instance == 0 and unique == 1 and index >= 1
    assert h == 0x40000000 + index * 0x40 == make_handle(index, 1)
    assert t.get(h, HandleType.DEVICE) == "dev"
    assert t.get(h) == "dev"  # no type asked: any type matches
    assert len(t) == 1


def test_wrong_type_stale_and_foreign_rejected():
    space = HandleSpace()
    a, b = HandleTable(space), HandleTable(space)
    ha = a.alloc(HandleType.DEVICE, "a-dev")
    hb = b.alloc(HandleType.DEVICE, "b-dev")
    assert split(ha)[0] != split(hb)[0]  # one index space: never the same value twice
    assert a.get(ha, HandleType.CONTEXT) is None  # wrong type
    assert a.free(ha, HandleType.CONTEXT) is None and a.get(ha) == "a-dev"  # not freed either
    assert a.get(hb) is None and b.get(ha) is None  # foreign, both ways
    assert b.free(ha) is None and a.get(ha) == "a-dev"
    assert a.free(ha, HandleType.DEVICE) == "a-dev"
    assert a.get(ha) is None  # stale
    assert a.free(ha) is None  # double free


@pytest.mark.parametrize("bad", [0, -1, 1 << 32, 0x40000041, 0x4000_0000, "0x40000040", None,
                                 3.0])
def test_values_that_are_not_handles(bad):
    t = HandleTable(HandleSpace())
    t.alloc(HandleType.DEVICE, "dev")
    assert t.get(bad) is None and t.free(bad) is None


def test_freed_index_is_not_reused_soon_and_unique_advances():
    space = HandleSpace()
    t = HandleTable(space)
    first = t.alloc(HandleType.CONTEXT, 0)
    t.free(first)
    seen = [t.alloc(HandleType.CONTEXT, i) for i in range(MIN_FREE_ENTRIES)]
    assert all(split(h)[0] != split(first)[0] for h in seen)
    for _ in range(2000):
        h = t.alloc(HandleType.CONTEXT, 1)
        if split(h)[0] == split(first)[0]:
            assert split(h)[1] == 2 and h != first
            assert t.get(first) is None  # the old generation stays invalid
            break
        t.free(h)
    else:
        raise AssertionError("index never came back")


def test_unique_bits_cycle_one_two_three():
    space = HandleSpace()
    t = HandleTable(space)
    h = t.alloc(HandleType.DEVICE, 0)
    index = split(h)[0]
    uniques = [split(h)[1]]
    while len(uniques) < 5:
        t.free(h)
        h = t.alloc(HandleType.DEVICE, 0)
        if split(h)[0] == index:
            uniques.append(split(h)[1])
    assert uniques == [1, 2, 3, 1, 2]


def test_random_values_are_invalid():
    t = HandleTable(HandleSpace())
    live = {t.alloc(HandleType.DEVICE, i) for i in range(50)}
    rng = random.Random(7)
    for _ in range(20000):
        v = rng.getrandbits(32)
        if v not in live:
            assert t.get(v) is None


def test_per_process_cap():
    t = HandleTable(HandleSpace(), limit=3)
    hs = [t.alloc(HandleType.DEVICE, i) for i in range(3)]
    with pytest.raises(MemoryError):
        t.alloc(HandleType.DEVICE, 3)
    t.free(hs[0])
    t.alloc(HandleType.DEVICE, 4)


def test_clear_returns_every_index_and_items_lists_entries():
    space = HandleSpace()
    t = HandleTable(space)
    hs = [t.alloc(HandleType.DEVICE if i % 2 else HandleType.CONTEXT, i) for i in range(10)]
    assert sorted((h, ty, o) for h, ty, o in t.items()) == sorted(
        (h, HandleType.DEVICE if i % 2 else HandleType.CONTEXT, i) for i, h in enumerate(hs))
    assert space.in_use == 10
    t.clear()
    assert len(t) == 0 and space.in_use == 0
    assert all(t.get(h) is None for h in hs)


def test_two_spaces_are_independent():
    # No module state: two drivers (two spaces) hand out the same first handle.
    a, b = HandleTable(HandleSpace()), HandleTable(HandleSpace())
    assert a.alloc(HandleType.DEVICE, 1) == b.alloc(HandleType.DEVICE, 2)


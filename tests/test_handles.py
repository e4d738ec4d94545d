"""The guest handle manager: real bit layout, typed entries, stale/foreign/wrong-type rejection."""

import random

from dxg.guest.handles import MIN_FREE_ENTRIES, HandleSpace, HandleTable, HandleType, split_handle


def test_layout_and_first_generation():
    t = HandleTable(HandleSpace())
    h = t.alloc(HandleType.DEVICE, "dev")
    index, unique, instance = split_handle(h)
    assert instance == 0 and unique == 1 and index >= 1
    assert h == 0x40000000 + index * 0x40
    assert t.get(h, HandleType.DEVICE) == "dev"


def test_wrong_type_stale_and_foreign_rejected():
    space = HandleSpace()
    a, b = HandleTable(space), HandleTable(space)
    ha = a.alloc(HandleType.DEVICE, "a-dev")
    hb = b.alloc(HandleType.DEVICE, "b-dev")
    assert a.get(ha, HandleType.CONTEXT) is None  # wrong type
    assert a.get(hb) is None and b.get(ha) is None  # foreign, both ways
    assert a.free(ha, HandleType.DEVICE) == "a-dev"
    assert a.get(ha) is None  # stale
    assert a.free(ha) is None  # double free


def test_freed_index_is_not_reused_soon_and_unique_advances():
    space = HandleSpace()
    t = HandleTable(space)
    first = t.alloc(HandleType.CONTEXT, 0)
    t.free(first)
    seen = [t.alloc(HandleType.CONTEXT, i) for i in range(MIN_FREE_ENTRIES)]
    assert all(split_handle(h)[0] != split_handle(first)[0] for h in seen)
    for _ in range(2000):
        h = t.alloc(HandleType.CONTEXT, 1)
        if split_handle(h)[0] == split_handle(first)[0]:
            assert split_handle(h)[1] == 2 and h != first
            break
        t.free(h)
    else:
        raise AssertionError("index never came back")


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
    try:
        t.alloc(HandleType.DEVICE, 3)
    except MemoryError:
        pass
    else:
        raise AssertionError("the cap did not hold")
    t.free(hs[0])
    t.alloc(HandleType.DEVICE, 4)

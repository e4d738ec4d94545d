"""Where an allocation's bytes are committed, by priority: the local segment group or the
non-local one, and the moves between them that SetAllocationPriority and the queues cause.

An allocation wants the local group unless its private data asks for the non-local one. When
the local group has no room for a new allocation (or one being reclaimed, or one promoted), the
memory manager demotes local allocations of LOWER priority than the one that needs the room, of
any process and guest on the adapter, lowest priority first, then the oldest, into the non-local
group: their bytes stay where they are (on the soft adapter both groups are the host's memory,
so contents, mappings and GPU VAs are untouched), only the accounting moves, and
QueryAllocationResidency reports them RESIDENTINSHAREDMEMORY. Nothing is demoted when even all
candidates would not make room, nor for an allocation of equal priority: with every allocation at
the default priority, placement is first come, first served, as before priorities mattered.

An allocation that wants the local group but is committed in the non-local one (demoted, or
placed there when local was full) comes back:

- when its priority is raised (SetAllocationPriority), at once, demoting lower ones if needed;
- when a hardware queue of its device starts a command buffer (`promote_device`, from
  dxg.host.hwqueue): the work that uses the device's memory pages it back in first, highest
  priority first, where room is free or can be made from allocations of lower priority.

So SetAllocationPriority decides whose memory a queue's work finds in the local group when the
adapter's local memory is over-committed. The bytes moved each way are counted per process and
adapter (`Usage.demoted_bytes` / `promoted_bytes`, reported by QueryStatistics). Everything here
runs on the host's event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dxg.uapi.memory import GROUP_LOCAL, GROUP_NONLOCAL, PRIORITY_NORMAL

if TYPE_CHECKING:
    from dxg.host.allocation import Allocation
    from dxg.host.device import HostDevice
    from dxg.host.memory import Segments, Usage

__all__ = ["choose_group", "promote", "promote_device", "rank"]


def rank(priority: int) -> int:
    """The priority that orders placement (0, CreateAllocation's default, is NORMAL)."""
    return priority or PRIORITY_NORMAL


def _move(a: Allocation, group: int) -> None:
    segments = a.segments
    segments.unhold(a)
    segments.hold(a, group)


def _demote_for(segments: Segments, usage: Usage, nbytes: int, priority: int) -> bool:
    """Make room for ``nbytes`` in the local group for ``usage``'s process by demoting local
    allocations of lower priority than ``priority`` (lowest first, then oldest). All or
    nothing: when the room cannot be made, every move is undone."""
    if nbytes <= segments.room(GROUP_LOCAL, usage):
        return True
    victims = sorted((a for a in segments.local if rank(a.priority) < priority),
                     key=lambda a: rank(a.priority))  # stable: the oldest first among equals
    moved: list[Allocation] = []
    for victim in victims:
        if victim.size > segments.room(GROUP_NONLOCAL, victim.usage):
            continue
        _move(victim, GROUP_NONLOCAL)
        moved.append(victim)
        if nbytes <= segments.room(GROUP_LOCAL, usage):
            for a in moved:
                a.usage.demoted_bytes += a.size
            return True
    for a in reversed(moved):
        _move(a, GROUP_LOCAL)
    return False


def choose_group(segments: Segments, usage: Usage, size: int, want_nonlocal: bool,
                 priority: int = 0) -> int | None:
    """The group ``size`` bytes of an allocation of ``priority`` go to, or None: first the
    process's quotas must have room (made, if need be, by discarding offered memory charged to
    them: dxg.host.quota); then free local room, local room made by demoting lower priorities,
    free non-local room, room made by discarding offered memory (local first)."""
    if not segments.make_quota_room(usage, size):
        return None
    if want_nonlocal:
        order: tuple[int, ...] = (GROUP_NONLOCAL,)
    else:
        order = (GROUP_LOCAL, GROUP_NONLOCAL)
        if _demote_for(segments, usage, size, rank(priority)):
            return GROUP_LOCAL
    for group in order:
        if size <= segments.room(group, usage):
            return group
    for group in order:
        if segments.make_room(group, usage, size):
            return group
    return None


def promote(a: Allocation) -> bool:
    """Bring a demoted allocation back into the local group if room is free or can be made
    from lower priorities. Whether it is local now."""
    if a.group == GROUP_LOCAL:
        return True
    if not a.alive or a.discarded or not a.wants_local:
        return False
    if not _demote_for(a.segments, a.usage, a.size, rank(a.priority)):
        return False
    _move(a, GROUP_LOCAL)
    a.usage.promoted_bytes += a.size
    return True


def promote_device(device: HostDevice) -> int:
    """Before a queue of ``device`` runs work: its demoted allocations back into the local group
    (highest priority first) where room allows. The bytes moved in."""
    demoted = device.adapter.segments.demoted
    if not demoted:
        return 0
    mine = sorted((a for a in demoted if a.device is device),
                  key=lambda a: rank(a.priority), reverse=True)
    return sum(a.size for a in mine if promote(a))

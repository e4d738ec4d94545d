"""Access masks of shared objects (ShareObjects' ``desired_access``), as Windows defines them.

The real driver ignores ``desired_access``; pydxg grants what it asks for (docs/sharing.md): a
share descriptor either lets its holders write (a resource: write its memory from the CPU and the
GPU; a sync object: signal it) or only read. Write access comes with GENERIC_WRITE, GENERIC_ALL,
MAXIMUM_ALLOWED, the objects' own write bit (SHARED_ALLOCATION_WRITE, 1; the sync objects' modify
state bits), or a mask of 0, which is what callers of the real driver pass (it meant all access
there, and still does).

pydxg tells an opener the access it got: QueryResourceInfoFromNtHandle and
OpenResourceFromNtHandle answer OPENED_READ_ONLY in their ``reserved`` field (0: write access),
and OpenSyncObjectFromNtHandle2 sets ``flags.no_signal`` when the fence was opened read-only.
"""

from __future__ import annotations

__all__ = [
    "GENERIC_ALL",
    "GENERIC_EXECUTE",
    "GENERIC_READ",
    "GENERIC_WRITE",
    "MAXIMUM_ALLOWED",
    "OPENED_READ_ONLY",
    "SHARED_ALLOCATION_ALL_ACCESS",
    "SHARED_ALLOCATION_WRITE",
    "STANDARD_RIGHTS_REQUIRED",
    "SYNCHRONIZE",
    "grants_write",
]

GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
GENERIC_EXECUTE = 0x20000000
GENERIC_ALL = 0x10000000
MAXIMUM_ALLOWED = 0x02000000
SYNCHRONIZE = 0x00100000
STANDARD_RIGHTS_REQUIRED = 0x000F0000
SHARED_ALLOCATION_WRITE = 0x0001  # d3dkmthk.h
SHARED_ALLOCATION_ALL_ACCESS = STANDARD_RIGHTS_REQUIRED | SHARED_ALLOCATION_WRITE
# pydxg: the ``reserved`` field of QueryResourceInfoFromNtHandle / OpenResourceFromNtHandle on
# return: the share descriptor grants reading only (the real driver leaves it 0).
OPENED_READ_ONLY = 0x1
_MODIFY_STATE = 0x0002  # EVENT_MODIFY_STATE / SEMAPHORE_MODIFY_STATE
_WRITE = GENERIC_WRITE | GENERIC_ALL | MAXIMUM_ALLOWED | SHARED_ALLOCATION_WRITE | _MODIFY_STATE


def grants_write(desired_access: int) -> bool:
    """Whether a share asked for with ``desired_access`` lets its holders write."""
    mask = desired_access & 0xFFFFFFFF
    return mask == 0 or bool(mask & _WRITE)

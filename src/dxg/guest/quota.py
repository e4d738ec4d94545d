"""Fair shares: every finite resource a process can take from the others (handles of the
driver's index space, objects on the hosts) is bounded per process and per user, so one process
or one user can never use up what every user shares. Root is bounded per process only.

The defaults keep a margin: the handle space (2**24) takes 64 users at their cap, and a host's
per-guest budget (HostConfig.max_partition_bytes, 256 MiB: about a million objects of 256 bytes)
takes 8 users at theirs; the host also caps each of its processes
(HostConfig.max_objects_per_process). Memory itself is bounded by the adapters' segments.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from dxg.guest.errors import IoctlError

__all__ = ["GuestLimits", "Quota", "QuotaExceeded"]


class QuotaExceeded(MemoryError):
    """A share is used up (-ENOMEM to the caller, STATUS_NO_MEMORY to a D3DKMT client)."""


@dataclass(frozen=True, slots=True)
class GuestLimits:
    handles_per_process: int = 1 << 16
    handles_per_uid: int = 1 << 18
    objects_per_process: int = 1 << 15  # devices, contexts, allocations, queues, fences
    objects_per_uid: int = 1 << 17

    def __post_init__(self) -> None:
        for name in ("handles_per_process", "handles_per_uid", "objects_per_process",
                     "objects_per_uid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


class Quota:
    """A bounded count (None: unbounded), shared by the processes of one user."""

    __slots__ = ("limit", "used", "what")

    def __init__(self, limit: int | None, what: str) -> None:
        self.limit = limit
        self.used = 0
        self.what = what

    def charge(self, n: int = 1) -> None:
        if self.limit is not None and self.used + n > self.limit:
            raise QuotaExceeded(f"{self.what}: {self.used} of {self.limit} in use")
        self.used += n

    def release(self, n: int = 1) -> None:
        self.used = max(0, self.used - n)

    def __repr__(self) -> str:
        return f"<Quota {self.what} {self.used}/{self.limit}>"


def charge_object(process_quota: Quota, uid_quota: Quota) -> None:
    """One more host object for a process (both shares), or -ENOMEM saying which is full."""
    try:
        process_quota.charge()
    except QuotaExceeded as e:
        raise IoctlError(errno.ENOMEM, str(e)) from None
    try:
        uid_quota.charge()
    except QuotaExceeded as e:
        process_quota.release()
        raise IoctlError(errno.ENOMEM, str(e)) from None

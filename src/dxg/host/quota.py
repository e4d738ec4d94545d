"""Memory quotas on the host: what bounds one process's committed bytes on an adapter besides the
segments' capacity.

Three quotas can bind a process, each per adapter and over both segment groups together:

- its own (``per_process``, asked by its guest with PYDXG_SETPROCESSQUOTA);
- its account's (``per_account``): the guest names an account for each process (pydxg guests use
  the uid), and the processes of one account on one guest share one total;
- its guest's (``HostConfig.guest_memory``): every process of the partition together.

Each group of processes has a `Ledger`: the bytes it has committed on the adapter. The ledgers
are kept by `dxg.host.memory.Segments._update`, the one place a commitment changes, so they are
always exactly what the segments hold: a discarded offered allocation counts nowhere until it is
reclaimed; a demotion or promotion moves bytes between groups and changes no ledger.

Enforcement lives here on the host rather than in the guest because only the host sees every
change as it happens (an offered allocation discarded to make room for another guest's, a
reclaim, a process's memory dropped when its guest goes); a guest-side count would have to
mirror them and could drift. The guest knows who its users are and says so; the host does the
counting. A guest that lies about its accounts only shares its own quota differently among its
own processes: the guest quota holds whatever it says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dxg.protocol.messages import NO_LIMIT

__all__ = ["NO_LIMIT", "GuestLedgers", "Ledger", "ProcessQuota", "left_of"]


class Ledger:
    """Bytes committed on one adapter by one group of processes (a process, an account of a
    guest, a guest), and how many usages count in it."""

    __slots__ = ("used", "users")

    def __init__(self) -> None:
        self.used = 0
        self.users = 0

    def __repr__(self) -> str:
        return f"<Ledger {self.used} bytes, {self.users} users>"


Bound = tuple[Ledger, int]  # a ledger and the limit its bytes may not pass


def left_of(bounds: tuple[Bound, ...]) -> int | None:
    """The bytes that may still be committed under every bound (None: no bound)."""
    if not bounds:
        return None
    return max(0, min(limit - ledger.used for ledger, limit in bounds))


@dataclass(frozen=True, slots=True)
class ProcessQuota:
    """What a guest asked for one of its processes: its account and the two limits (None: no
    limit), per adapter."""

    account: int = 0
    per_process: int | None = None
    per_account: int | None = None

    @classmethod
    def from_wire(cls, account: int, per_process: int, per_account: int) -> ProcessQuota:
        return cls(account, None if per_process == NO_LIMIT else per_process,
                   None if per_account == NO_LIMIT else per_account)


class GuestLedgers:
    """One partition's shared ledgers: the guest's own per adapter (bound by ``guest_limit``)
    and each account's per adapter. A ledger lives while a usage counts in it."""

    def __init__(self, guest_limit: int | None) -> None:
        self.guest_limit = guest_limit
        self._guests: dict[int, Ledger] = {}  # adapter index -> the guest's ledger
        self._accounts: dict[tuple[int, int], Ledger] = {}  # (account, adapter) -> ledger

    def _ledger(self, table: dict, key: object, hold: bool) -> Ledger:
        ledger = table.get(key)
        if ledger is None:
            ledger = Ledger()
            if not hold:
                return ledger  # a view of a process that holds nothing there: not kept
            table[key] = ledger
        if hold:
            ledger.users += 1
        return ledger

    def ledgers(self, quota: ProcessQuota, adapter: int, own: Ledger,
                hold: bool) -> tuple[tuple[Ledger, ...], tuple[Bound, ...]]:
        """(every ledger a usage of a process with ``quota`` on ``adapter`` counts in, the
        bounds that apply to it). ``hold``: the usage is real and keeps its ledgers until
        `release`; otherwise they are only looked at."""
        guest = self._ledger(self._guests, adapter, hold)
        account = self._ledger(self._accounts, (quota.account, adapter), hold)
        bounds: list[Bound] = []
        if quota.per_process is not None:
            bounds.append((own, quota.per_process))
        if quota.per_account is not None:
            bounds.append((account, quota.per_account))
        if self.guest_limit is not None:
            bounds.append((guest, self.guest_limit))
        return (own, account, guest), tuple(bounds)

    def release(self, quota: ProcessQuota, adapter: int) -> None:
        """A usage that held its ledgers is gone."""
        for table, key in ((self._guests, adapter), (self._accounts, (quota.account, adapter))):
            ledger = table.get(key)
            if ledger is not None:
                ledger.users -= 1
                if ledger.users <= 0:
                    del table[key]

    def census(self, adapters: Iterable[int]) -> list[dict[str, int | None]]:
        """Per adapter (those given, and any with a ledger): the guest's committed bytes and
        its limit."""
        return [{"adapter": adapter,
                 "used": ledger.used if (ledger := self._guests.get(adapter)) else 0,
                 "limit": self.guest_limit}
                for adapter in sorted({*adapters, *self._guests})]

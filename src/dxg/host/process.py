"""Host processes: one per CREATEPROCESS, the owner of everything a guest process creates."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dxg.host.device import HostDevice


@dataclass(eq=False, slots=True)
class HostProcess:
    handle: int
    pid: int
    name: str
    cookie: int  # the guest's opaque process pointer, kept and never dereferenced
    linux_process: bool = True
    devices: dict[int, "HostDevice"] = field(default_factory=dict)

    @property
    def context_count(self) -> int:
        return sum(len(d.contexts) for d in self.devices.values())

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "pid": self.pid,
            "name": self.name,
            "cookie": self.cookie,
            "linux_process": self.linux_process,
            "devices": [d.census() for d in self.devices.values()],
            "device_count": len(self.devices),
            "context_count": self.context_count,
        }

"""Host devices: one per CREATEDEVICE, owned by a process, bound to one adapter."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dxg.uapi.structs import d3dkmt_deviceexecution_state

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.context import HostContext
    from dxg.host.process import HostProcess

EXECUTION_ACTIVE = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE)
EXECUTION_STATES = frozenset(int(s) for s in d3dkmt_deviceexecution_state)


@dataclass(eq=False, slots=True)
class HostDevice:
    handle: int
    process: "HostProcess"
    adapter: "HostAdapter"
    flags: int
    # The guest's device-state cookie (CREATEDEVICE.error_code): opaque to the host, echoed in
    # SETGUESTDATA whenever this device's execution state changes.
    error_code: int
    execution_state: int = EXECUTION_ACTIVE
    contexts: dict[int, "HostContext"] = field(default_factory=dict)
    flushes: int = 0

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "adapter": self.adapter.index,
            "flags": self.flags,
            "execution_state": self.execution_state,
            "contexts": [c.census() for c in self.contexts.values()],
        }

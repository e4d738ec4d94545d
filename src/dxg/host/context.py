"""Host contexts: one per CREATECONTEXTVIRTUAL, owned by a device."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dxg.host.device import HostDevice


@dataclass(eq=False, slots=True)
class HostContext:
    handle: int
    device: "HostDevice"
    node_ordinal: int
    engine_affinity: int
    flags: int
    client_hint: int
    # Only the size of the guest's private driver data is kept: the bytes are echoed in the
    # reply and nothing on this host reads them, so a guest cannot pin memory with them.
    priv_drv_data_size: int = 0

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "node_ordinal": self.node_ordinal,
            "engine_affinity": self.engine_affinity,
            "flags": self.flags,
            "client_hint": self.client_hint,
            "priv_drv_data_size": self.priv_drv_data_size,
        }

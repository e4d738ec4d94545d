"""The pydxg host: adapters, one partition per guest, and the DXGK command handlers.

    host = Host(HostConfig(adapters=2))
    address = host.listen("/run/pydxg/host.sock")   # or "tcp:127.0.0.1:0"
    ...
    host.census()        # JSON-able: what every guest's processes hold on this host
    host.remove_adapter(1)
    host.close()
"""

from dxg.host.adapter import AdapterOpen, HostAdapter, parse_umd_private_blob, umd_private_blob
from dxg.host.call import CommandFailed
from dxg.host.config import AdapterIdentity, HostConfig, adapter_identity
from dxg.host.handles import HandleTable, HandleType
from dxg.host.host import Host
from dxg.host.partition import Partition

__all__ = [
    "AdapterIdentity",
    "AdapterOpen",
    "CommandFailed",
    "HandleTable",
    "HandleType",
    "Host",
    "HostAdapter",
    "HostConfig",
    "Partition",
    "adapter_identity",
    "parse_umd_private_blob",
    "umd_private_blob",
]

"""Guest <-> host wire protocol, sans I/O: bytes in, typed messages out.

Two layers, both defined only here:
- `framing` and `bus`: the emulated VMBus (frames on one connection, channel offers, opens,
  rescinds, version negotiation, the 128 KiB packet cap).
- `commands`, `headers` and `messages`: the DXGK command set carried inside channel packets
  (real `DXGK_VMBCOMMAND_*` codes, real header and body layouts of dxgvmbus.h on x86-64).
Nothing in this package touches a socket; see docs/protocol.md for the byte layouts.
"""

from dxg.protocol.errors import ProtocolError

__all__ = ["ProtocolError"]

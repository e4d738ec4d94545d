"""The emulated VMBus: transports (Unix, TCP), one multiplexed connection per guest<->host link,
channels with per-channel request ids, and the bus logic that offers channels on the host and
matches them to drivers (probe/remove) on the guest. The bus does not know which transport it
runs on; wire bytes are defined in dxg.protocol.
"""

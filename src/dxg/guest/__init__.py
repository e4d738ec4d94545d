"""The guest driver: per-bus-device state, adapters, processes, handle tables, object trees and
the ioctl handlers behind the node. It validates, translates and forwards; the host does the
GPU-semantic work."""

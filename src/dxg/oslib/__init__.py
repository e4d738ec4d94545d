"""Thin, stateless helpers over the OS: descriptors that travel over Unix sockets
(:mod:`.fds`), another process's memory and descriptors (:mod:`.procmem`), and shared memory
(:mod:`.memfd`). Shared by the client, the node, the guest and the host; no module here keeps
state."""

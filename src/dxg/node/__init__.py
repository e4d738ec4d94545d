"""The node front ends: the Unix socket (:mod:`dxg.node.server`) and the FUSE device file
(:mod:`dxg.node.fuse`), both serving a guest driver on its event loop. The wire they speak and
where the node lives by default are contract (:mod:`dxg.uapi.wire`, :mod:`dxg.uapi.nodepath`)."""

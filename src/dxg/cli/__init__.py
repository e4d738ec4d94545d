"""The `dxg` command line: daemons (up, host, guest) and tools (ls, ps, demo, uapi-header)."""

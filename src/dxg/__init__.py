"""pydxg: dxgkrnl-style GPU paravirtualization in user space."""

__version__ = "0.1.0"

"""``dxg bench``: what paravirtualization costs, measured beside native and beside Ray."""

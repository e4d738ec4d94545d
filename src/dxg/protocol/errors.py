"""The one exception protocol code raises for bytes that do not parse."""


class ProtocolError(ValueError):
    """Malformed, truncated, oversized or unknown bytes from the other side."""

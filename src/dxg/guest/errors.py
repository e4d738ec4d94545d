"""How a handler bails out: raise IoctlError(errno) and the dispatcher returns -errno."""


class IoctlError(Exception):
    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or f"errno {err}")
        self.errno = err

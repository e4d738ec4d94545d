"""Stream transports. The only place in the bus that touches sockets."""

import contextlib
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass


class TransportError(OSError):
    """A transport could not be set up (bad address, nothing listening, ...)."""


# A peer that does not read for this long is dropped: no send may block forever (a stuck
# sender would hold the send lock and hang every other sender, close() included).
SEND_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Address:
    family: int
    target: str | tuple[str, int]

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.target}"
        host, port = self.target  # type: ignore[misc]
        return f"tcp:{host}:{port}"


def parse_address(text: str) -> Address:
    """'unix:/path', '/path' or './path' (Unix socket); 'tcp:HOST:PORT' or 'HOST:PORT' (TCP)."""
    if text.startswith("unix:"):
        return Address(socket.AF_UNIX, text[5:])
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or ":" not in text:
        return Address(socket.AF_UNIX, text)
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return Address(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port)))
    except ValueError:
        raise TransportError(f"bad TCP address {text!r}: port must be a number") from None


class Transport:
    """A connected stream socket: whole-buffer sends under a lock, plain receives.

    close() only shuts the socket down, which wakes a reader blocked in recv(); the descriptor
    itself is released by release(), called once no thread can be blocked on it (so a reused
    descriptor number can never be read by a stale reader)."""

    def __init__(self, sock: socket.socket, peer: str, send_timeout: float = SEND_TIMEOUT) -> None:
        self.sock = sock
        self.peer = peer
        self._send_lock = threading.Lock()
        self._closed = False
        self._released = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sec = int(send_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", sec, int((send_timeout - sec) * 1e6)))

    def send(self, data: bytes, lock_timeout: float | None = None) -> None:
        """Send all of `data`. A peer that stops reading for SEND_TIMEOUT breaks the transport
        (ConnectionError); with `lock_timeout`, give up (TimeoutError) rather than wait longer
        than that behind another sender."""
        if not self._send_lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
            raise TimeoutError(f"{self.peer}: another send is stuck")
        try:
            self.sock.sendall(data)
        except BlockingIOError:
            self.close()  # part of a frame may be gone: the stream is unusable
            raise ConnectionError(f"{self.peer} stopped reading; connection dropped") from None
        finally:
            self._send_lock.release()

    def recv(self, size: int = 1 << 18) -> bytes:
        return self.sock.recv(size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        self.close()  # wakes a sender blocked in sendall, so the lock below comes free
        with self._send_lock:
            if not self._released:
                self._released = True
                self.sock.close()


def connect(address: str | Address, timeout: float = 5.0) -> Transport:
    addr = parse_address(address) if isinstance(address, str) else address
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr.target)
    except OSError as e:
        sock.close()
        raise TransportError(e.errno, f"cannot reach {addr}: {e.strerror or e}") from None
    sock.settimeout(None)
    return Transport(sock, str(addr))


class Listener:
    """A listening socket for the host side; unlinks its Unix path on close."""

    def __init__(self, address: str | Address, backlog: int = 64) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        sock = socket.socket(self.address.family, socket.SOCK_STREAM)
        try:
            if self.address.family == socket.AF_UNIX:
                path = str(self.address.target)
                _remove_stale_socket(path)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address.target)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise TransportError(e.errno, f"cannot listen on {self.address}: {e.strerror or e}") from None
        self.sock = sock
        if self.address.family != socket.AF_UNIX:
            host, port = sock.getsockname()[:2]
            self.address = Address(self.address.family, (host, port))

    def accept(self) -> Transport:
        conn, peer = self.sock.accept()
        return Transport(conn, str(peer) if peer else str(self.address))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.address.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(str(self.address.target))


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to clobber a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, f"{path} is in use by a running server")

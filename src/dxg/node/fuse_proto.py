"""The Linux FUSE kernel protocol, sans I/O: request bytes in, typed requests out, reply bytes back.

Only what a one-file device node needs: the root of the mount *is* the file (mounted with
``rootmode=0100000``), so the kernel talks to us about exactly one inode (``FUSE_ROOT_ID``).
Layouts follow ``<linux/fuse.h>`` (protocol 7.x, little-endian, x86-64 and arm64 alike).

A request read from ``/dev/fuse`` is one ``fuse_in_header`` and an opcode-specific body::

    fuse_in_header (40 bytes): u32 len, u32 opcode, u64 unique, u64 nodeid,
                               u32 uid, u32 gid, u32 pid, u16 total_extlen, u16 padding

``pid`` is the *thread* id of the caller (in the mounting process's PID namespace), 0 for
requests the kernel makes on its own. A reply written back is one ``fuse_out_header``
(u32 len, i32 error, u64 unique) and, when error is 0, the opcode's reply body. FORGET,
BATCH_FORGET and INTERRUPT take no reply.

:func:`parse` turns one request into a :class:`Request` (``body`` is a memoryview into the read
buffer: copy what must outlive it); the ``*_reply`` functions build replies as a list of byte
strings for one ``writev``. Nothing here reads, writes or remembers anything.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "FOPEN_DIRECT_IO",
    "FOPEN_NOFLUSH",
    "FOPEN_NONSEEKABLE",
    "FUSE_KERNEL_MINOR_VERSION",
    "FUSE_KERNEL_VERSION",
    "FUSE_ROOT_ID",
    "Attr",
    "InitIn",
    "IoctlIn",
    "Op",
    "ProtocolViolation",
    "Request",
    "attr_reply",
    "empty_reply",
    "error_reply",
    "init_reply",
    "ioctl_reply",
    "open_reply",
    "parse",
    "parse_fh",
    "parse_init",
    "parse_interrupt",
    "parse_ioctl",
    "parse_open",
    "statfs_reply",
]

FUSE_KERNEL_VERSION = 7
# The minor version we speak. Every reply layout we send is the same for 7.23 and later.
FUSE_KERNEL_MINOR_VERSION = 31
FUSE_ROOT_ID = 1

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_NOFLUSH = 1 << 5  # Linux 5.19+: close() sends no FLUSH (older kernels ignore the bit)

# fuse_ioctl_in.flags
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_32BIT = 1 << 3

# The smallest read buffer the kernel accepts (FUSE_MIN_READ_BUFFER).
FUSE_MIN_READ_BUFFER = 8192


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# Requests the kernel expects no reply to.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # 40
_OUT_HEADER = struct.Struct("<IiQ")  # 16
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (then flags2, unused)
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88
_ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy (then fuse_attr)
_OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
_IOCTL_IN = struct.Struct("<QIIQII")  # fh, flags, cmd, arg, in_size, out_size (32)
_IOCTL_OUT = struct.Struct("<iIII")  # result, flags, in_iovs, out_iovs
_KSTATFS = struct.Struct("<QQQQQIIII24x")  # 80
_FH = struct.Struct("<Q")  # the first field of release/flush/read/write bodies
_U32 = struct.Struct("<I")

IN_HEADER_SIZE = _IN_HEADER.size
OUT_HEADER_SIZE = _OUT_HEADER.size


class ProtocolViolation(Exception):
    """The kernel sent bytes that do not parse (a short or inconsistent request)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request: the ``fuse_in_header`` fields and the opcode-specific body."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


@dataclass(frozen=True, slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int


@dataclass(frozen=True, slots=True)
class IoctlIn:
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: memoryview  # in_size bytes: the top-level struct as the caller had it


@dataclass(frozen=True, slots=True)
class Attr:
    """What GETATTR reports for the node's one file."""

    ino: int = FUSE_ROOT_ID
    mode: int = stat.S_IFREG | 0o666
    uid: int = 0
    gid: int = 0
    time_ns: int = 0
    nlink: int = 1
    blksize: int = 4096


def parse(buf: memoryview) -> Request:
    """One request from the bytes a single ``read()`` of ``/dev/fuse`` returned."""
    if len(buf) < IN_HEADER_SIZE:
        raise ProtocolViolation(f"request of {len(buf)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = _IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolViolation(f"request says {length} bytes, read returned {len(buf)}")
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER_SIZE:])


def parse_init(req: Request) -> InitIn:
    if len(req.body) < _INIT_IN.size:
        raise ProtocolViolation("short INIT")
    return InitIn(*_INIT_IN.unpack_from(req.body))


def parse_ioctl(req: Request) -> IoctlIn:
    if len(req.body) < _IOCTL_IN.size:
        raise ProtocolViolation("short IOCTL")
    fh, flags, cmd, arg, in_size, out_size = _IOCTL_IN.unpack_from(req.body)
    data = req.body[_IOCTL_IN.size:]
    if len(data) != in_size:
        raise ProtocolViolation(f"IOCTL says {in_size} bytes in, carries {len(data)}")
    return IoctlIn(fh, flags, cmd, arg, in_size, out_size, data)


def parse_open(req: Request) -> int:
    """The ``open(2)`` flags of an OPEN (``fuse_open_in.flags``)."""
    if len(req.body) < _U32.size:
        raise ProtocolViolation("short OPEN")
    return int(_U32.unpack_from(req.body)[0])


def parse_interrupt(req: Request) -> int:
    """The ``unique`` of the request an INTERRUPT is about."""
    if len(req.body) < _FH.size:
        raise ProtocolViolation("short INTERRUPT")
    return int(_FH.unpack_from(req.body)[0])


def parse_fh(req: Request) -> int:
    """The file handle that OPEN returned, from RELEASE/FLUSH/READ/WRITE/POLL bodies."""
    if len(req.body) < _FH.size:
        raise ProtocolViolation(f"short {req.opcode} body")
    return int(_FH.unpack_from(req.body)[0])


# ---- replies -------------------------------------------------------------------------------------


def _reply(unique: int, error: int, *body: bytes) -> list[bytes]:
    size = OUT_HEADER_SIZE + sum(len(b) for b in body)
    return [_OUT_HEADER.pack(size, error, unique), *body]


def error_reply(unique: int, err: int) -> list[bytes]:
    """Fail the request with ``err`` (a positive errno; sent as ``-err``)."""
    if err <= 0:
        raise ValueError(f"errno must be positive, got {err}")
    return _reply(unique, -err)


def empty_reply(unique: int) -> list[bytes]:
    """Success with no body (FLUSH, RELEASE, DESTROY, ...)."""
    return _reply(unique, 0)


def init_reply(unique: int, kernel: InitIn, flags: int = 0, max_write: int = 4096,
               max_background: int = 16, congestion_threshold: int = 12) -> list[bytes]:
    """Answer INIT. A kernel speaking a newer major gets our major alone, and asks again."""
    if kernel.major > FUSE_KERNEL_VERSION:
        return _reply(unique, 0, _INIT_OUT.pack(FUSE_KERNEL_VERSION, 0, 0, 0, 0, 0, 0, 0,
                                                0, 0, 0, 0))
    minor = min(kernel.minor, FUSE_KERNEL_MINOR_VERSION)
    body = _INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, kernel.max_readahead,
                          flags & kernel.flags, max_background, congestion_threshold,
                          max_write, 1, 0, 0, 0, 0)
    return _reply(unique, 0, body)


def _attr_bytes(a: Attr) -> bytes:
    sec, nsec = divmod(a.time_ns, 1_000_000_000)
    return _ATTR.pack(a.ino, 0, 0, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, a.uid,
                      a.gid, 0, a.blksize, 0)


def attr_reply(unique: int, attr: Attr, valid_s: float) -> list[bytes]:
    sec = int(valid_s)
    nsec = int((valid_s - sec) * 1e9)
    return _reply(unique, 0, _ATTR_OUT.pack(sec, nsec, 0), _attr_bytes(attr))


def open_reply(unique: int, fh: int, open_flags: int) -> list[bytes]:
    return _reply(unique, 0, _OPEN_OUT.pack(fh, open_flags, 0))


def ioctl_reply(unique: int, result: int, out: bytes = b"") -> list[bytes]:
    """The ioctl's return value (``result``: what ``ioctl()`` returns, or ``-errno``) and the
    bytes the kernel copies back to the caller's struct (at most ``out_size``)."""
    if not -(1 << 31) <= result < (1 << 31):
        raise ValueError(f"ioctl result {result} does not fit in 32 bits")
    if out:
        return _reply(unique, 0, _IOCTL_OUT.pack(result, 0, 0, 0), out)
    return _reply(unique, 0, _IOCTL_OUT.pack(result, 0, 0, 0))


def statfs_reply(unique: int, bsize: int = 4096, namelen: int = 255) -> list[bytes]:
    return _reply(unique, 0, _KSTATFS.pack(0, 0, 0, 1, 0, bsize, namelen, bsize, 0))

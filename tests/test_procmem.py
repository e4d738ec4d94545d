"""dxg.oslib.procmem: reading and writing another process's memory, taking its descriptors.

Real processes throughout: a child Python process holds a buffer (or an eventfd) and reports its
address (or fd number); this process reads, writes and takes it, and the child confirms."""

import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import threading

import pytest

from conftest import CountingSyscalls
from dxg.guest.errors import IoctlError
from dxg.guest.usermem import UserMemoryFault, copy_from_user, copy_to_user
from dxg.oslib.procmem import (
    FrontEndLimit,
    PinnedProcessMemory,
    ProcessVmUserMemory,
    Syscalls,
    TakeFdError,
    take_fd,
    task_identity,
    thread_group_of,
)

PAGE = os.sysconf("SC_PAGE_SIZE")

CHILD = r"""
import ctypes, os, sys
buf = ctypes.create_string_buffer(b"hello from the child", 64)
efd = os.eventfd(0, os.EFD_CLOEXEC)
print(ctypes.addressof(buf), efd, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "show":
        print(buf.raw[:32].hex(), flush=True)
    elif cmd == "eventfd":
        print(os.eventfd_read(efd), flush=True)
    elif cmd == "quit":
        break
"""


def _readline(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError("child printed nothing")
    return proc.stdout.readline().strip()


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        addr, efd = map(int, _readline(proc).split())
        yield proc, addr, efd
    finally:
        proc.kill()
        proc.wait()


class _Pages:
    """Two anonymous pages of this process, the second unmapped: a range crossing the
    boundary is only partly readable."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        self._libc = libc
        addr = libc.mmap(None, 2 * PAGE, 3, 0x22, -1, 0)  # RW, MAP_PRIVATE|MAP_ANONYMOUS
        assert addr not in (None, ctypes.c_void_p(-1).value)
        assert libc.munmap(ctypes.c_void_p(addr + PAGE), PAGE) == 0
        self.addr = addr
        ctypes.memset(addr, 0x5A, PAGE)

    def close(self) -> None:
        self._libc.munmap(ctypes.c_void_p(self.addr), PAGE)


def test_read_and_write_own_memory() -> None:
    buf = ctypes.create_string_buffer(b"abcdefgh", 16)
    mem = ProcessVmUserMemory(os.getpid())
    assert mem.read(ctypes.addressof(buf), 8) == b"abcdefgh"
    mem.write(ctypes.addressof(buf) + 2, b"XY")
    assert buf.raw[:8] == b"abXYefgh"
    assert mem.read(ctypes.addressof(buf), 0) == b""
    mem.write(ctypes.addressof(buf), b"")


def test_read_and_write_another_process(child) -> None:
    proc, addr, _efd = child
    mem = ProcessVmUserMemory(proc.pid, Syscalls())
    assert mem.read(addr, 20) == b"hello from the child"
    mem.write(addr + 6, b"FROM")
    proc.stdin.write("show\n")
    proc.stdin.flush()
    assert bytes.fromhex(_readline(proc)).startswith(b"hello FROM the child")


def test_bad_addresses_fault() -> None:
    mem = ProcessVmUserMemory(os.getpid())
    pages = _Pages()
    try:
        assert mem.read(pages.addr, PAGE) == b"\x5a" * PAGE
        # Crossing into the unmapped page: a partial transfer is a fault, not a short read.
        with pytest.raises(UserMemoryFault, match="only 4096 of 8192"):
            mem.read(pages.addr, 2 * PAGE)
        with pytest.raises(UserMemoryFault):
            mem.write(pages.addr + PAGE - 4, b"12345678")
        with pytest.raises(UserMemoryFault):
            mem.read(pages.addr + PAGE, 8)
    finally:
        pages.close()
    for addr in (0, -8, 16):
        with pytest.raises(UserMemoryFault):
            mem.read(addr, 8)
    with pytest.raises(UserMemoryFault):
        mem.read((1 << 64) - 4, 8)


def test_faults_become_efault_through_the_driver_accessor() -> None:
    mem = ProcessVmUserMemory(os.getpid())
    pages = _Pages()
    try:
        with pytest.raises(IoctlError) as e:
            copy_from_user(mem, pages.addr + PAGE, 16, 4096)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(IoctlError) as e:
            copy_to_user(mem, pages.addr + PAGE - 1, b"ab")
        assert e.value.errno == errno.EFAULT
        assert copy_from_user(mem, pages.addr, 16, 4096) == b"\x5a" * 16
        with pytest.raises(IoctlError) as e:
            copy_from_user(mem, pages.addr, 8192, 4096)  # over the limit: nothing is read
        assert e.value.errno == errno.EINVAL
    finally:
        pages.close()


def test_a_vanished_process_faults() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    mem = ProcessVmUserMemory(proc.pid)
    with pytest.raises(UserMemoryFault):
        mem.read(0x10000, 8)
    with pytest.raises(ValueError):
        ProcessVmUserMemory(0)


def test_take_fd_shares_the_eventfd(child) -> None:
    proc, _addr, efd = child
    fd = take_fd(proc.pid, efd)
    try:
        assert os.get_inheritable(fd) is False
        os.eventfd_write(fd, 41)
        os.eventfd_write(fd, 1)
        proc.stdin.write("eventfd\n")
        proc.stdin.flush()
        assert _readline(proc) == "42"
    finally:
        os.close(fd)
    fd = ProcessVmUserMemory(proc.pid).take_fd(efd)
    os.close(fd)


def test_take_fd_errors(child) -> None:
    proc, _addr, _efd = child
    with pytest.raises(TakeFdError) as e:
        take_fd(proc.pid, 987)
    assert e.value.errno == errno.EBADF
    with pytest.raises(TakeFdError) as e:
        take_fd(proc.pid, -1)
    assert e.value.errno == errno.EBADF
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(TakeFdError) as e:
        take_fd(gone.pid, 0)
    assert e.value.errno == errno.ESRCH


def test_what_a_file_server_cannot_do_says_so() -> None:
    mem = ProcessVmUserMemory(os.getpid())
    fd = os.dup(0)
    with pytest.raises(FrontEndLimit) as e:
        mem.give_fd_to_user(fd, 0x1000)
    assert e.value.errno == errno.EOPNOTSUPP and "socket node" in str(e.value)
    with pytest.raises(OSError):
        os.fstat(fd)  # handed over, so closed
    with pytest.raises(FrontEndLimit):
        mem.map_block(1, 4096, 0, 16, fd=os.dup(0))
    assert mem.unmap_block(1)  # nothing was ever mapped: nothing to say


def test_thread_group_of_threads_and_processes() -> None:
    assert thread_group_of(os.getpid()) == os.getpid()
    seen: list[int | None] = []
    t = threading.Thread(target=lambda: seen.append(thread_group_of(threading.get_native_id())))
    t.start()
    t.join()
    assert seen == [os.getpid()]
    assert thread_group_of(0) is None
    ident = task_identity(os.getpid())
    assert ident is not None and ident[0] == os.getpid() and ident[1]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert thread_group_of(gone.pid) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_another_users_memory_as_root() -> None:
    """The node runs as root and serves every user: ptrace rights over other users' processes.
    The other process is plain ``sleep`` run as nobody; its first mapping is its ELF header."""
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, user=65534, group=65534)
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            start = int(f.readline().split("-")[0], 16)
        assert ProcessVmUserMemory(proc.pid).read(start, 4) == b"\x7fELF"
        os.close(take_fd(proc.pid, 0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ---- pinned callers --------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pinned_reads_writes_and_takes_through_the_pidfd(child) -> None:
    proc, addr, efd = child
    sys_ = CountingSyscalls()
    before = _open_fds()
    with PinnedProcessMemory.pin(proc.pid, sys_) as mem:
        assert (mem.tgid, mem.tid) == (proc.pid, proc.pid) and mem.alive()
        assert mem.read(addr, 20) == b"hello from the child"
        mem.write(addr + 6, b"PINS")
        fd = mem.take_fd(efd)
        os.eventfd_write(fd, 7)
        os.close(fd)
        with pytest.raises(TakeFdError) as e:
            mem.take_fd(987)
        assert e.value.errno == errno.EBADF
    assert _open_fds() == before  # the pidfd is closed with the pin
    proc.stdin.write("show\n")
    proc.stdin.flush()
    assert bytes.fromhex(_readline(proc)).startswith(b"hello PINS the child")
    proc.stdin.write("eventfd\n")
    proc.stdin.flush()
    assert _readline(proc) == "7"
    assert sys_.calls == [("process_vm_readv", proc.pid), ("process_vm_writev", proc.pid)]


def test_a_thread_pins_its_process() -> None:
    buf = ctypes.create_string_buffer(b"thread", 8)
    seen: list[tuple[int, int, bytes]] = []

    def run() -> None:
        tid = threading.get_native_id()
        with PinnedProcessMemory.pin(tid, Syscalls()) as mem:
            seen.append((mem.tid, mem.tgid, mem.read(ctypes.addressof(buf), 6)))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen and seen[0][1:] == (os.getpid(), b"thread") and seen[0][0] != os.getpid()


def test_revoked_or_dead_callers_are_never_touched(child) -> None:
    """Once revoked (the request was answered or interrupted) or once the caller has exited,
    every access fails before any system call reaches a pid."""
    proc, addr, efd = child
    sys_ = CountingSyscalls()
    mem = PinnedProcessMemory.pin(proc.pid, sys_)
    try:
        mem.revoke("the call was answered")
        with pytest.raises(UserMemoryFault, match="answered"):
            mem.read(addr, 4)
        with pytest.raises(UserMemoryFault, match="answered"):
            mem.write(addr, b"x")
        with pytest.raises(TakeFdError):
            mem.take_fd(efd)
    finally:
        mem.close()
    mem = PinnedProcessMemory.pin(proc.pid, sys_)
    try:
        proc.kill()
        proc.wait()  # exited and reaped: its pid may now be anyone's
        assert not mem.alive()
        with pytest.raises(UserMemoryFault, match="exited"):
            mem.write(addr, b"x")
        with pytest.raises(UserMemoryFault):
            mem.read(addr, 4)
    finally:
        mem.close()
    assert sys_.calls == []
    with pytest.raises(UserMemoryFault):
        mem.read(addr, 4)  # closed: still refused


def test_pinning_a_missing_thread_fails() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(OSError) as e:
        PinnedProcessMemory.pin(gone.pid, Syscalls())
    assert e.value.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL)

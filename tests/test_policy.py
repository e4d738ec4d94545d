"""Isolation and quotas (docs/policy.md): the guest's policy file and flags, adapters hidden from
users (socket node and FUSE file), per-process and per-user memory quotas enforced to the byte by
the hosts, the host's quota per guest, and one view of it all in QueryVideoMemoryInfo,
QueryAdapterInfo(GETSEGMENTSIZE) and `dxg ps`.

Clients are real processes of real users: they start as root (to import pydxg wherever the
interpreter lives), then become the user (tests/clients/memuser.py); they need root, as CI is.
Waits have deadlines (conftest.wait_until), never fixed sleeps."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLIENTS, make_stack, wait_until
from dxg.client import DxgError, open_node
from dxg.guest.driver import GuestDriver
from dxg.guest.policy import ROOT_GRANT, AdapterRef, PolicyError, load_policy, parse_policy
from dxg.host.memory import Segments, Usage
from dxg.host.quota import GuestLedgers, ProcessQuota
from dxg.node.fuse import FuseNode, FuseUnavailable, fuse_available
from dxg.runtime.sizes import format_size, parse_size
from dxg.uapi import wddm
from dxg.uapi.memory import GROUP_LOCAL, GROUP_NONLOCAL, PAGE_SIZE
from dxg.uapi.ntstatus import NTSTATUS

ROOT_DIR = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="runs clients as other users")
NO_FUSE = fuse_available()
MiB = 1 << 20
NO_MEMORY = int(NTSTATUS.STATUS_NO_MEMORY)
INVALID = int(NTSTATUS.STATUS_INVALID_PARAMETER) & 0xFFFFFFFF
# Users and groups of the tests (numeric: nothing needs to exist in /etc/passwd).
ALICE, BOB, CAROL = 41001, 41002, 41003
GPU_GROUP = 41500


# ---- sizes and the policy file, no stack --------------------------------------------------------


@pytest.mark.parametrize(("text", "n"), [
    (4096, 4096), ("4096", 4096), ("1K", 1024), ("512M", 512 * MiB), ("2G", 2 << 30),
    ("1.5G", 3 << 29), ("64mib", 64 * MiB), ("3 MB", 3 * MiB), ("0", 0), ("1T", 1 << 40),
])
def test_sizes_are_read_as_people_write_them(text: object, n: int) -> None:
    assert parse_size(text) == n
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("bad", ["", "12Q", "-1", "1.2.3G", "G", True, 1.5, -4, None, "1e9"])
def test_a_bad_size_says_what_a_size_is(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


def _doc_example() -> str:
    text = (ROOT_DIR / "docs" / "policy.md").read_text(encoding="utf-8")
    return re.search(r"```toml\n(.*?)```", text, re.S).group(1)


def test_the_documented_example_parses_and_means_what_it_says() -> None:
    import grp
    import pwd

    try:
        video = grp.getgrnam("video").gr_gid
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("this machine has no 'video' group or 'nobody' user")
    policy = parse_policy(_doc_example(), "policy.md")
    d = policy.defaults
    assert (d.adapters, d.memory_per_process, d.memory_per_uid) == ((AdapterRef(index=0),),
                                                                   2 << 30, 6 << 30)
    ml = policy.grant_for(ALICE, (ALICE, video))  # by a supplementary group
    assert (ml.rule, ml.adapters, ml.memory_per_process, ml.memory_per_uid) == (
        "ml-team", None, 8 << 30, 16 << 30)
    assert policy.grant_for(ALICE, (44,)).rule == "ml-team"  # a gid, as written
    batch = policy.grant_for(nobody, (nobody,))
    assert batch.adapters == (AdapterRef(host=0, index=1), AdapterRef(luid=0x10000ABCD))
    assert (batch.memory_per_process, batch.memory_per_uid) == (512 * MiB, 6 << 30)  # inherited
    assert policy.grant_for(BOB, (BOB,)) is d
    root = policy.grant_for(0, (0, video))  # root: only the rule that names it
    assert (root.rule, root.adapters, root.memory_per_process, root.memory_per_uid) == (
        "ops", (AdapterRef(index=0),), None, None)
    assert policy.needs_host_index and policy.has_memory_quotas


def test_root_is_unrestricted_unless_a_rule_names_it() -> None:
    policy = parse_policy('[defaults]\nadapters = "none"\nmemory_per_process = "1M"\n'
                          f'[[rules]]\ngroups = [0, {GPU_GROUP}]\nadapters = [1]\n',
                          memory_per_uid=8 * MiB)
    assert policy.grant_for(0, (0, GPU_GROUP)) is ROOT_GRANT  # neither defaults nor groups
    assert policy.grant_for(ALICE, (ALICE,)).adapters == ()
    g = policy.grant_for(ALICE, (ALICE, GPU_GROUP))
    assert (g.adapters, g.memory_per_process, g.memory_per_uid) == ((AdapterRef(index=1),),
                                                                   MiB, 8 * MiB)
    assert policy.needs_host_index  # (adapters by number: each host is asked at start)


def test_flags_set_the_defaults_and_rules_inherit_them(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[defaults]\nmemory_per_process = "1G"\n'
                    f'[[rules]]\nuids = [{ALICE}]\nmemory_per_uid = "unlimited"\n'
                    f'[[rules]]\nuids = [{BOB}]\nmemory_per_process = "2M"\n')
    policy = load_policy(path, memory_per_process=3 * MiB, memory_per_uid=5 * MiB)
    assert (policy.defaults.memory_per_process, policy.defaults.memory_per_uid) == (3 * MiB,
                                                                                    5 * MiB)
    a, b = policy.grant_for(ALICE, ()), policy.grant_for(BOB, ())
    assert (a.memory_per_process, a.memory_per_uid) == (3 * MiB, None)
    assert (b.memory_per_process, b.memory_per_uid) == (2 * MiB, 5 * MiB)
    flags_only = load_policy(None, memory_per_process=MiB)
    assert flags_only.grant_for(ALICE).memory_per_process == MiB
    assert flags_only.grant_for(0) is ROOT_GRANT
    assert not load_policy(None).has_memory_quotas


BAD_POLICIES = [
    ("[defaults\n", "not valid TOML"),
    ("[default]\n", "unknown key 'default' (known: defaults, rules, version)"),
    ("version = 2\n", "version: 2: this pydxg reads version 1"),
    ('[defaults]\nmemory = "1G"\n', "[defaults]: unknown key 'memory' (known: adapters, "
                                    "compute_share, memory_per_process, memory_per_uid)"),
    ('[defaults]\ncompute_share = 0\n',
     "[defaults].compute_share: 0 is not a compute share (use a whole number 1..10000"),
    ('[[rules]]\nuids = [1]\ncompute_share = "3"\n',
     "[[rules]] #1.compute_share: '3' is not a compute share"),
    ('[[rules]]\nuids = [1]\ncompute_share = 2.5\n', "2.5 is not a compute share"),
    ('[defaults]\nmemory_per_process = "4X"\n',
     "[defaults].memory_per_process: '4X' is not a size (use bytes, or a number with K, M, G"),
    ('[defaults]\nadapters = ["gpu0"]\n',
     "[defaults].adapters[0]: 'gpu0' is not an adapter (use an adapter index like 0"),
    ('[defaults]\nadapters = "some"\n', "is not \"all\", \"none\" or a list of adapters"),
    ('[[rules]]\nuids = ["no-such-user-pydxg"]\n',
     "[[rules]] #1.uids[0]: no user named 'no-such-user-pydxg' on this machine"),
    ('[[rules]]\ngroups = ["no-such-group-pydxg"]\n', "no group named 'no-such-group-pydxg'"),
    ('[[rules]]\nname = "x"\nadapters = [0]\n', "[[rules]] #1: names nobody: give uids or "
                                                "groups (or both)"),
    ("rules = 3\n", "rules: must be an array of tables: write each as [[rules]]"),
    ('[[rules]]\nuids = [1]\nadapter = [0]\n', "[[rules]] #1: unknown key 'adapter'"),
    ('[[rules]]\nuids = [-1]\n', "[[rules]] #1.uids[0]: -1 is not a user name or id"),
]


@pytest.mark.parametrize(("text", "message"), BAD_POLICIES)
def test_a_bad_policy_says_where_and_what_to_fix(tmp_path: Path, text: str,
                                                 message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert message in str(e.value)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def _dxg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dxg.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("command", ["up", "guest"])
def test_the_cli_refuses_a_bad_policy_with_one_line(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\nmemory_per_uid = "lots"\n')
    extra = ["--connect", "unix:/nonexistent"] if command == "guest" else []
    r = _dxg(command, *extra, "--node", str(tmp_path / "n.sock"), "--policy", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [f"dxg {command}: {bad}: [defaults].memory_per_uid: 'lots' is not a size "
                     '(use bytes, or a number with K, M, G or T (powers of 1024), e.g. "512M" '
                     'or "1.5G"), or "unlimited"'], r.stderr
    missing = tmp_path / "missing.toml"
    r = _dxg(command, *extra, "--node", str(tmp_path / "n.sock"), "--policy", str(missing))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"dxg {command}: cannot read the policy file {missing}: "
                                "No such file or directory")
    assert not (tmp_path / "n.sock").exists()  # nothing was started


def test_a_bad_size_flag_is_refused_by_the_parser(tmp_path: Path) -> None:
    for args in (["up", "--memory-per-process", "4X"], ["host", "--listen", "/x",
                                                         "--guest-memory", "lots"]):
        r = _dxg(*args)
        assert r.returncode == 2
        assert "is not a size (use bytes, or a number with K, M, G or T" in r.stderr


# ---- the host's quota arithmetic, no stack -----------------------------------------------------


class _Offered:
    """An offered allocation as Segments.make_quota_room sees it."""

    def __init__(self, segments: Segments, usage: Usage, size: int, seq: int) -> None:
        self.segments, self.usage, self.size = segments, usage, size
        self.group, self.offer_priority, self.offer_seq = GROUP_LOCAL, 1, seq
        self.discarded = False
        segments.commit(usage, GROUP_LOCAL, size)
        segments.offered[self] = None

    def discard(self) -> None:
        self.discarded = True
        self.segments.uncommit(self.usage, self.group, self.size)
        self.segments.offered.pop(self, None)


def _usage(segments: Segments, ledgers: GuestLedgers, quota: ProcessQuota) -> Usage:
    from dxg.host.quota import Ledger

    usage = Usage(segments, 0, *ledgers.ledgers(quota, 0, Ledger(), True))
    segments.join(usage)
    return usage


def test_the_ledgers_count_exactly_what_is_committed_and_bound_the_view() -> None:
    segments = Segments(64 * MiB, 64 * MiB)
    ledgers = GuestLedgers(guest_limit=10 * MiB)
    a = _usage(segments, ledgers, ProcessQuota(7, per_process=4 * MiB, per_account=6 * MiB))
    b = _usage(segments, ledgers, ProcessQuota(7, per_process=4 * MiB, per_account=6 * MiB))
    c = _usage(segments, ledgers, ProcessQuota(8))  # another account, bound by the guest only
    segments.commit(a, GROUP_LOCAL, 3 * MiB)
    segments.commit(a, GROUP_NONLOCAL, MiB)
    assert a.left() == 0 and a.limit() == 4 * MiB
    assert segments.info(GROUP_LOCAL, a) == (3 * MiB, 3 * MiB, 0, 3 * MiB)
    assert segments.info(GROUP_NONLOCAL, a) == (MiB, MiB, 0, MiB)
    assert segments.sizes(a) == (4 * MiB, 4 * MiB)
    assert b.left() == 2 * MiB  # what the account has left
    assert segments.info(GROUP_LOCAL, b)[0] == 2 * MiB
    segments.commit(c, GROUP_LOCAL, 5 * MiB)
    assert b.left() == MiB and c.left() == MiB  # the guest's 10 MiB: 4 + 5 used
    assert segments.sizes(c) == (10 * MiB, 10 * MiB)
    # a move between groups changes no ledger
    segments.uncommit(a, GROUP_LOCAL, MiB)
    segments.commit(a, GROUP_NONLOCAL, MiB)
    assert a.left() == 0 and b.left() == MiB
    # every ledger is exactly the sum of its usages
    own_a, account, guest = a.ledgers
    assert own_a.used == 4 * MiB and account.used == 4 * MiB and guest.used == 9 * MiB
    assert guest.used == sum(segments.committed)
    for u in (a, b, c):
        segments.uncommit(u, GROUP_LOCAL, u.committed[GROUP_LOCAL])
        segments.uncommit(u, GROUP_NONLOCAL, u.committed[GROUP_NONLOCAL])
    assert own_a.used == account.used == guest.used == 0
    for _ in range(3):
        ledgers.release(ProcessQuota(7), 0)
    assert ledgers.census([0]) == [{"adapter": 0, "used": 0, "limit": 10 * MiB}]


def test_offered_memory_charged_to_a_short_quota_is_discarded_for_it() -> None:
    segments = Segments(64 * MiB, 64 * MiB)
    ledgers = GuestLedgers(None)
    a = _usage(segments, ledgers, ProcessQuota(1, per_process=2 * MiB))
    other = _usage(segments, ledgers, ProcessQuota(2))
    theirs = _Offered(segments, other, 8 * MiB, 1)  # not charged to a's quota: never chosen
    first, second = _Offered(segments, a, MiB, 2), _Offered(segments, a, MiB, 3)
    assert not segments.within_quota(a, MiB)
    assert not segments.make_quota_room(a, 3 * MiB)  # even both would not do: none goes
    assert not (first.discarded or second.discarded)
    assert segments.make_quota_room(a, MiB)  # the oldest offer goes, only it
    assert first.discarded and not second.discarded and not theirs.discarded
    assert a.committed[GROUP_LOCAL] == MiB and a.left() == MiB


# ---- real stacks, real users -------------------------------------------------------------------


class User:
    """A memuser.py client process of ``uid`` (see tests/clients/memuser.py)."""

    def __init__(self, node: str, uid: int, gid: int | None = None,
                 groups: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENTS / "memuser.py"), node, str(uid),
             str(uid if gid is None else gid), ",".join(map(str, groups))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hello = self._read()
        self.pid: int = hello["pid"]
        self.luids: list[int] = hello["luids"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"memuser exited: {err[-3000:]}")
        return json.loads(line)

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        reply = self.call(op, **kw)
        assert reply["ok"], (op, kw, reply)
        return reply

    def refused(self, op: str, **kw: Any) -> int:
        reply = self.call(op, **kw)
        assert not reply["ok"], (op, kw, reply)
        return reply["status"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def users() -> Iterator[list[User]]:
    made: list[User] = []
    yield made
    for u in made:
        u.close()


def _luids(s: Any) -> list[int]:
    return [a.luid for a in s.driver.active_adapters()]


def _host_process(s: Any, pid: int) -> dict[str, Any] | None:
    for p in s.host.census()["partitions"]:
        for proc in p["processes"]:
            if proc["pid"] == pid:
                return proc
    return None


def _memory_of(s: Any, pid: int, adapter: int = 0) -> dict[str, Any] | None:
    proc = _host_process(s, pid)
    for u in (proc or {}).get("memory", []):
        if u["adapter"] == adapter:
            return u
    return None


def _segments_used(s: Any, adapter: int = 0) -> int:
    return sum(s.host.adapters[adapter].segments.committed)


@needs_root
def test_adapters_a_user_may_not_use_are_invisible_through_the_socket(public_dir: Path,
                                                                       users: list[User]) -> None:
    """Defaults: adapter 0 only; a group rule: adapter 1 only (by LUID); root: both. A hidden
    adapter is not enumerated, and opening it by LUID (or asking EnumProcesses about it) fails
    exactly as for a LUID that names nothing."""
    with make_stack(public_dir, "vis", adapters=3, host_id="vis") as s0:
        luids = _luids(s0)
    policy = parse_policy(f'[defaults]\nadapters = [0]\n[[rules]]\ngroups = [{GPU_GROUP}]\n'
                          f'adapters = ["0x{luids[1]:016x}", "0:2"]\n')
    with make_stack(public_dir, "vis", adapters=3, host_id="vis",
                    driver_kw={"policy": policy}) as s:
        assert _luids(s) == luids
        alice = User(s.node_path, ALICE)
        users.append(alice)
        assert alice.luids == [luids[0]]
        bob = User(s.node_path, BOB, groups=(GPU_GROUP,))  # in the group: a supplementary one
        users.append(bob)
        assert bob.luids == [luids[1], luids[2]]
        unknown = alice.refused("open", luid=0x7777_0000_1234)
        assert unknown == INVALID
        assert alice.refused("open", luid=luids[1]) == unknown
        assert alice.refused("processes", luid=luids[1]) == alice.refused(
            "processes", luid=0x7777_0000_1234)
        assert bob.refused("open", luid=luids[0]) == unknown
        bob.ok("alloc", luid=luids[1], sizes=[PAGE_SIZE])
        with open_node(s.node_path) as node:  # root: everything
            assert [a.luid for a in node.adapters()] == luids
            assert bob.pid in node.processes(luids[1])
        snap = s.driver.snapshot()
        grants = {p["pid"]: p["grant"] for p in snap["processes"]}
        assert grants[alice.pid]["rule"] == "defaults" and grants[alice.pid]["adapters"] == ["0"]
        assert grants[bob.pid]["rule"] == "rule 1"
        assert GPU_GROUP in {g for p in snap["processes"] if p["pid"] == bob.pid
                             for g in p["gids"]}


def _fuse_probe(path: Path, uid: int, visible: int, hidden: int,
                groups: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """A process of ``uid`` that opens the FUSE file and prints what EnumAdapters3 counts and
    what OpenAdapterFromLuid of ``visible``, ``hidden`` and a LUID of nothing answer."""
    code = f"""
import ctypes, errno, fcntl, json, os
from dxg import uapi
from dxg.uapi import structs as s
os.setgroups({list(groups)!r}); os.setgid({uid}); os.setuid({uid})
fd = os.open({str(path)!r}, os.O_RDWR | os.O_CLOEXEC)
e = s.d3dkmt_enumadapters3()
e.filter.include_compute_only = 1
buf = bytearray(bytes(e))
fcntl.ioctl(fd, uapi.IOCTLS_BY_NAME["LX_DXENUMADAPTERS3"].code, buf, True)
count = s.d3dkmt_enumadapters3.from_buffer_copy(buf).adapter_count
def open_luid(luid):
    o = s.d3dkmt_openadapterfromluid()
    o.adapter_luid.a, o.adapter_luid.b = luid & 0xFFFFFFFF, luid >> 32
    b = bytearray(bytes(o))
    try:
        fcntl.ioctl(fd, uapi.IOCTLS_BY_NAME["LX_DXOPENADAPTERFROMLUID"].code, b, True)
    except OSError as err:
        return -err.errno
    return 0
print(json.dumps({{"count": count, "visible": open_luid({visible}), "hidden": open_luid({hidden}),
                  "nothing": open_luid(0x7777_0000_1234)}}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


@needs_root
@pytest.mark.skipif(NO_FUSE is not None, reason=f"!!! FUSE UNAVAILABLE ({NO_FUSE}): the device "
                    "file's policy is NOT being tested !!!")
def test_adapters_a_user_may_not_use_are_invisible_through_fuse(public_dir: Path) -> None:
    policy = parse_policy(f'[[rules]]\nuids = [{ALICE}]\nadapters = [1]\n'
                          f'[[rules]]\ngroups = [{GPU_GROUP}]\nadapters = ["0:0"]\n')
    with make_stack(public_dir, "vf", driver_kw={"policy": policy}) as s:
        luids = _luids(s)
        node = FuseNode(s.driver, public_dir / "dxg", mode=0o666)
        try:
            try:
                node.start()
            except FuseUnavailable as e:
                pytest.skip(f"!!! FUSE UNAVAILABLE ({e}): the device file is NOT tested !!!")
            r = _fuse_probe(node.path, ALICE, visible=luids[1], hidden=luids[0])
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"count": 1, "visible": 0, "hidden": -errno.EINVAL,
                                            "nothing": -errno.EINVAL}
            r = _fuse_probe(node.path, CAROL, visible=luids[0], hidden=luids[1],
                            groups=(GPU_GROUP,))  # by a supplementary group
            assert json.loads(r.stdout) == {"count": 1, "visible": 0, "hidden": -errno.EINVAL,
                                            "nothing": -errno.EINVAL}, r.stderr
            r = _fuse_probe(node.path, BOB, visible=luids[0], hidden=0x7777_0000_1234)
            assert json.loads(r.stdout)["count"] == 2, r.stderr  # no rule: the defaults (all)
            wait_until(lambda: not node.processes(), what="the probes' files released")
        finally:
            node.close()


@needs_root
def test_a_process_quota_holds_to_the_byte(public_dir: Path, users: list[User]) -> None:
    """Exactly at the quota succeeds, one page more fails and makes nothing (a batch that
    would pass it makes none of its allocations); freeing gives the bytes back; the budget
    QueryVideoMemoryInfo answers is what may be allocated, and GETSEGMENTSIZE the quota."""
    quota = 3 * MiB + 5 * PAGE_SIZE
    with make_stack(public_dir, "pq", driver_kw={
            "policy": load_policy(None, memory_per_process=quota)}) as s:
        alice = User(s.node_path, ALICE)
        users.append(alice)
        luid = alice.luids[0]
        info = alice.ok("info", luid=luid)
        assert info["local"]["budget"] == quota and info["nonlocal"]["budget"] == quota
        assert info["local"]["available"] == quota
        assert info["sizes"] == {"local": quota, "nonlocal": quota}
        # a batch that would pass the quota: refused whole
        assert alice.refused("alloc", luid=luid, sizes=[quota, PAGE_SIZE]) == NO_MEMORY
        assert alice.ok("info", luid=luid)["local"]["usage"] == 0
        assert _segments_used(s) == 0
        # exactly the quota, in two groups and a size that rounds up to the last page
        first = alice.ok("alloc", luid=luid, sizes=[2 * MiB])["ids"]
        rest = alice.ok("alloc", luid=luid, sizes=[MiB + 5 * PAGE_SIZE - 100],
                        non_local=True)["ids"]
        info = alice.ok("info", luid=luid)
        assert (info["local"]["usage"], info["nonlocal"]["usage"]) == (2 * MiB,
                                                                       MiB + 5 * PAGE_SIZE)
        assert (info["local"]["budget"], info["nonlocal"]["budget"]) == (2 * MiB,
                                                                         MiB + 5 * PAGE_SIZE)
        assert info["local"]["available"] == 2 * MiB
        assert alice.refused("alloc", luid=luid, sizes=[1]) == NO_MEMORY
        assert alice.refused("alloc", luid=luid, sizes=[PAGE_SIZE], non_local=True) == NO_MEMORY
        # reservations stay within the budget
        assert alice.refused("reserve", luid=luid, bytes=2 * MiB + PAGE_SIZE) == NO_MEMORY
        alice.ok("reserve", luid=luid, bytes=2 * MiB)
        # what the host commits is exactly what the guest was asked for, page-rounded
        mem = _memory_of(s, alice.pid)
        assert (mem["local"], mem["nonlocal"], mem["limit"], mem["left"]) == (
            2 * MiB, MiB + 5 * PAGE_SIZE, quota, 0)
        assert _segments_used(s) == quota
        alice.ok("free", ids=first)
        info = alice.ok("info", luid=luid)
        assert info["local"]["budget"] == 2 * MiB and info["local"]["usage"] == 0
        again = alice.ok("alloc", luid=luid, sizes=[2 * MiB])["ids"]
        assert alice.refused("alloc", luid=luid, sizes=[PAGE_SIZE]) == NO_MEMORY
        alice.ok("free", ids=again + rest)
        assert _segments_used(s) == 0
        # root is not bound by the defaults
        with open_node(s.node_path) as node:
            ad = node.adapters()[0]
            with ad.create_device() as dev:
                big = dev.allocate(quota + MiB)
                assert ad.video_memory_info(0).budget == s.host.adapters[0].segments.capacity[0]
                big.close()


@needs_root
def test_a_user_quota_is_shared_by_the_users_processes(public_dir: Path,
                                                        users: list[User]) -> None:
    """Two processes of one user share its quota (each also held to its own); another user
    has a quota of its own; a killed process gives its bytes back at once, and the other's
    budget grows by them."""
    policy = load_policy(None, memory_per_process=3 * MiB, memory_per_uid=4 * MiB)
    with make_stack(public_dir, "uq", driver_kw={"policy": policy}) as s:
        one, two = User(s.node_path, ALICE), User(s.node_path, ALICE)
        carol = User(s.node_path, CAROL)
        users.extend([one, two, carol])
        luid = one.luids[0]
        one.ok("alloc", luid=luid, sizes=[3 * MiB])
        info = two.ok("info", luid=luid)
        assert info["local"]["budget"] == MiB  # what the user has left
        assert info["sizes"] == {"local": 3 * MiB, "nonlocal": 3 * MiB}  # the lowest quota
        two.ok("alloc", luid=luid, sizes=[MiB - PAGE_SIZE])
        two.ok("alloc", luid=luid, sizes=[PAGE_SIZE], non_local=True)  # exactly the user's quota
        assert two.refused("alloc", luid=luid, sizes=[PAGE_SIZE]) == NO_MEMORY
        assert one.refused("alloc", luid=luid, sizes=[PAGE_SIZE]) == NO_MEMORY
        carol.ok("alloc", luid=luid, sizes=[3 * MiB])  # another user: its own quota
        assert one.ok("info", luid=luid)["local"]["budget"] == 3 * MiB
        one.kill()
        wait_until(lambda: _host_process(s, one.pid) is None, 20, "the killed process dropped")
        assert _segments_used(s) == 4 * MiB  # two's 1 MiB and carol's 3
        info = two.ok("info", luid=luid)
        assert info["local"]["budget"] == 3 * MiB - PAGE_SIZE  # own quota, less its non-local
        two.ok("alloc", luid=luid, sizes=[2 * MiB])
        assert two.refused("alloc", luid=luid, sizes=[PAGE_SIZE]) == NO_MEMORY


@needs_root
def test_discarded_offers_do_not_count_and_reclaim_is_under_the_quota(
        public_dir: Path, users: list[User]) -> None:
    with make_stack(public_dir, "oq", driver_kw={
            "policy": load_policy(None, memory_per_process=2 * MiB)}) as s:
        alice = User(s.node_path, ALICE)
        users.append(alice)
        luid = alice.luids[0]
        kept = alice.ok("alloc", luid=luid, sizes=[MiB])["ids"]
        offered = alice.ok("alloc", luid=luid, sizes=[MiB])["ids"]
        alice.ok("offer", luid=luid, ids=offered)
        assert alice.ok("info", luid=luid)["local"]["usage"] == 2 * MiB  # offered: counted
        newer = alice.ok("alloc", luid=luid, sizes=[MiB])["ids"]  # the offer is discarded
        assert alice.ok("info", luid=luid)["local"]["usage"] == 2 * MiB
        assert _segments_used(s) == 2 * MiB
        assert alice.ok("reclaim", luid=luid, ids=offered)["results"] == [2]  # NOT_COMMITTED
        alice.ok("free", ids=newer)
        assert alice.ok("reclaim", luid=luid, ids=offered)["results"] == [1]  # DISCARDED: back
        assert alice.ok("info", luid=luid)["local"]["usage"] == 2 * MiB
        alice.ok("free", ids=kept + offered)
        assert _segments_used(s) == 0


@needs_root
def test_every_query_and_dxg_ps_report_one_view(public_dir: Path, users: list[User]) -> None:
    """QueryVideoMemoryInfo, GETSEGMENTSIZE and `dxg ps` (table and JSON) show the same
    budgets and quotas for a process, from the host's one function."""
    policy = load_policy(None, memory_per_process=6 * MiB, memory_per_uid=10 * MiB)
    with make_stack(public_dir, "view", driver_kw={"policy": policy},
                    guest_memory=5 * MiB) as s:
        alice = User(s.node_path, ALICE)
        users.append(alice)
        luid = alice.luids[0]
        alice.ok("alloc", luid=luid, sizes=[2 * MiB])
        alice.ok("alloc", luid=luid, sizes=[MiB], non_local=True)
        info = alice.ok("info", luid=luid)
        # the guest's 5 MiB binds first: 2 MiB left
        assert (info["local"]["budget"], info["nonlocal"]["budget"]) == (4 * MiB, 3 * MiB)
        assert info["sizes"] == {"local": 5 * MiB, "nonlocal": 5 * MiB}
        r = subprocess.run([sys.executable, "-m", "dxg.cli.main", "ps", "--json",
                            "--node", s.node_path], capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        proc = next(p for p in data["snapshot"]["processes"] if p["pid"] == alice.pid)
        link = next(a for a in proc["adapters"] if a["luid"] == f"0x{luid:016x}")
        assert link["memory"] == 3 * MiB
        assert link["budget"] == {"local": 4 * MiB, "nonlocal": 3 * MiB, "limit": 5 * MiB}
        assert proc["grant"]["memory_per_process"] == 6 * MiB
        (partition,) = [h["census"] for h in data["census"]["hosts"]]
        hp = next(p for p in partition["processes"] if p["pid"] == alice.pid)
        assert hp["quota"] == {"account": ALICE, "per_process": 6 * MiB,
                               "per_account": 10 * MiB}
        mem = next(u for u in hp["memory"] if u["adapter"] == 0)
        assert (mem["local_available"], mem["nonlocal_available"], mem["left"]) == (
            info["local"]["available"], info["nonlocal"]["available"], 2 * MiB)
        assert {"adapter": 0, "used": 3 * MiB, "limit": 5 * MiB} in partition["guest_memory"]
        table = subprocess.run([sys.executable, "-m", "dxg.cli.main", "ps", "--node",
                                s.node_path], capture_output=True, text=True, timeout=60,
                               check=False)
        row = next(line for line in table.stdout.splitlines() if str(alice.pid) in line)
        assert "3.0M" in row and "4.0M/3.0M" in row and str(ALICE) in row, table.stdout


@needs_root
def test_the_host_quota_per_guest_binds_each_guest(public_dir: Path) -> None:
    """HostConfig.guest_memory: each guest's processes together, root's included, whatever
    the guest's own policy; a second guest (a second driver in this process) has its own."""
    with make_stack(public_dir, "gq", guest_memory=3 * MiB) as s:
        second = GuestDriver(name="second")
        try:
            second.bind(s.host_address)
            assert second.wait_for_adapters(2, 15)
            from dxg.node.server import SocketNode

            other = SocketNode(second, str(public_dir / "second.sock"))
            other.start()
            try:
                with open_node(s.node_path) as node, open_node(other.path) as node2:
                    ad = node.adapters()[0]
                    with ad.create_device() as dev, node2.adapters()[0].create_device() as dev2:
                        a = dev.allocate(2 * MiB)
                        b = dev.allocate_many([MiB - PAGE_SIZE, PAGE_SIZE])
                        with pytest.raises(DxgError) as e:
                            dev.allocate(1)
                        assert e.value.status == NTSTATUS.STATUS_NO_MEMORY
                        info = ad.video_memory_info(GROUP_LOCAL)
                        assert (info.budget, info.current_usage) == (3 * MiB, 3 * MiB)
                        seg = ad.query_info(wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_GETSEGMENTSIZE,
                                            wddm.D3DKMT_SEGMENTSIZEINFO())
                        assert seg.DedicatedVideoMemorySize == 3 * MiB
                        assert seg.SharedSystemMemorySize == 3 * MiB
                        c = dev2.allocate(3 * MiB)  # the other guest: its own 3 MiB
                        with pytest.raises(DxgError):
                            dev2.allocate(PAGE_SIZE)
                        for x in (a, *b, c):
                            x.close()
                        dev.allocate(3 * MiB).close()
            finally:
                other.close()
        finally:
            second.close()
        census = s.host.census()
        assert all(entry["used"] == 0 for p in census["partitions"]
                   for entry in p["guest_memory"])


def test_a_driver_without_a_policy_changes_nothing(tmp_path: Path) -> None:
    """No policy, no host quota: every adapter, budgets = capacities, no quota message."""
    with make_stack(tmp_path, "none") as s, open_node(s.node_path) as node:
        ads = node.adapters()
        assert len(ads) == 2
        info = ads[0].video_memory_info(GROUP_NONLOCAL)
        assert info.budget == s.host.adapters[0].segments.capacity[GROUP_NONLOCAL]
        seg = ads[0].query_info(wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_GETSEGMENTSIZE,
                                wddm.D3DKMT_SEGMENTSIZEINFO())
        assert seg.DedicatedVideoMemorySize == s.host.adapters[0].segments.capacity[GROUP_LOCAL]
        proc = s.host.census()["partitions"][0]["processes"]
        assert all(p["quota"]["per_process"] is None for p in proc)


def test_a_host_takes_quotas_only_before_memory_is_in_use(tmp_path: Path) -> None:
    """PYDXG_SETPROCESSQUOTA once the process committed memory: INVALID_PARAMETER (every byte
    must be counted under the quotas it has)."""
    from dxg.guest import vmbus
    from dxg.guest.process import existing_host_process

    with make_stack(tmp_path, "late") as s, open_node(s.node_path) as node:
        ad = node.adapters()[0]
        (proc,) = s.driver.processes()
        link = s.driver.links()[0]

        def send_quota() -> int:
            hprocess = s.driver.rt.call(existing_host_process, proc, link)
            return s.driver.rt.run(vmbus.set_process_quota(link, hprocess, 5, MiB, None))

        with ad.create_device() as dev:
            assert send_quota() == NTSTATUS.STATUS_SUCCESS
            dev.allocate(PAGE_SIZE)
            assert send_quota() == NTSTATUS.STATUS_INVALID_PARAMETER

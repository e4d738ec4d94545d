"""The guest's policy: which users see which adapters, the memory quotas of their processes and
their compute share.

Read once at start from a TOML file (``dxg up|guest --policy FILE``, format in docs/policy.md)
and from the flags that set its defaults (``--memory-per-process``, ``--memory-per-uid``,
``--compute-share``). A
process gets its `Grant` when it opens the node (its uid and groups from SO_PEERCRED /
SO_PEERGROUPS, or from the FUSE request): the first rule that names its uid or one of its groups,
else the defaults. Root (uid 0) is matched only by a rule that names uid 0 (or "root") itself:
neither the defaults nor a group rule restrict it, so root sees every adapter and has no memory
quota unless the policy says so (its compute share is the defaults' unless a rule names it:
a share is a weight, not a restriction).

A grant is enforced in two places: the guest hides the adapters it does not allow (enumeration,
OpenAdapterFromLuid, every call that names an adapter by LUID: dxg.guest.ioctl), and the hosts
count memory against its quotas (PYDXG_SETPROCESSQUOTA: dxg.host.quota), because only a host sees
every byte committed, discarded and reclaimed as it happens; they also share each adapter's
engine time by the processes' compute shares (the same message: dxg.host.scheduler), because
only a host sees the work run.

A process may lower its own grant, never raise it, before it uses any adapter
(`restrict_grant`: the socket node's "restrict" request, GuestDriver.restrict), so that a task
runs within a slice of what its user is granted.

Everything here is frozen: the policy is built once and only read.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxg.runtime.sizes import format_size, parse_size

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter

__all__ = ["MAX_SHARE", "RESTRICT_KEYS", "ROOT_GRANT", "AdapterRef", "Grant", "Policy",
           "PolicyError", "RestrictError", "load_policy", "parse_policy", "parse_share",
           "restrict_grant"]

ROOT_UID = 0
POLICY_VERSION = 1
_ADAPTER_HELP = ('an adapter index like 0, "HOST:INDEX" like "1:0", or a LUID like '
                 '"0x0000000100000002"')
_TOP_KEYS = frozenset({"version", "defaults", "rules"})
_GRANT_KEYS = frozenset({"adapters", "memory_per_process", "memory_per_uid", "compute_share"})
DEFAULT_SHARE = 1
MAX_SHARE = 10_000  # (as dxg.host.scheduler.MAX_SHARE: the wire carries 1..10000)
SHARE_HELP = (f"a whole number {DEFAULT_SHARE}..{MAX_SHARE}: the process's weight on each "
              "adapter's engine, against the other processes' (default 1)")
_RULE_KEYS = _GRANT_KEYS | {"name", "uids", "groups"}
_HOST_INDEX = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_UNLIMITED = "unlimited"


class PolicyError(ValueError):
    """A policy file that cannot be used; the text says where and what to fix."""


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One adapter a grant names: by LUID, or by its number on its host (the host's own
    adapter index, which its ADAPTERADDRESS reports as DeviceNumber) on one host (bind order:
    ``dxg up``'s host and a guest's first --connect are 0) or on any host."""

    luid: int | None = None
    host: int | None = None
    index: int | None = None

    def matches(self, adapter: GuestAdapter) -> bool:
        if self.luid is not None:
            return adapter.luid == self.luid
        if self.host is not None and adapter.link.index != self.host:
            return False
        return adapter.host_index is not None and adapter.host_index == self.index

    def __str__(self) -> str:
        if self.luid is not None:
            return f"0x{self.luid:016x}"
        return str(self.index) if self.host is None else f"{self.host}:{self.index}"


@dataclass(frozen=True, slots=True)
class Grant:
    """What the processes a rule matches may do: the adapters they see (None: all), their
    memory quotas in bytes per adapter (None: no quota) and their compute share (their weight
    on each adapter's engine)."""

    adapters: tuple[AdapterRef, ...] | None = None
    memory_per_process: int | None = None
    memory_per_uid: int | None = None
    rule: str = "defaults"  # where it came from (logs, the snapshot)
    compute_share: int = DEFAULT_SHARE
    # What the process itself asked for (`restrict`): only these guest LUIDs among those the
    # rule lets it see (None: no such restriction), and whether it restricted itself at all.
    only_luids: frozenset[int] | None = None
    restricted: bool = False

    def sees(self, adapter: GuestAdapter) -> bool:
        if self.only_luids is not None and adapter.luid not in self.only_luids:
            return False
        return self.adapters is None or any(ref.matches(adapter) for ref in self.adapters)

    @property
    def needs_host_index(self) -> bool:
        return self.adapters is not None and any(r.luid is None for r in self.adapters)

    def census(self) -> dict[str, Any]:
        return {"rule": self.rule,
                "adapters": None if self.adapters is None else [str(r) for r in self.adapters],
                "memory_per_process": self.memory_per_process,
                "memory_per_uid": self.memory_per_uid, "compute_share": self.compute_share,
                "only_luids": (None if self.only_luids is None
                               else [f"0x{luid:016x}" for luid in sorted(self.only_luids)]),
                "restricted": self.restricted}


ROOT_GRANT = Grant(rule="root")  # root, when no rule names it: everything, no quota


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    uids: frozenset[int]
    gids: frozenset[int]
    grant: Grant

    def matches(self, uid: int, gids: Iterable[int]) -> bool:
        if uid in self.uids:
            return True
        return uid != ROOT_UID and not self.gids.isdisjoint(gids)


@dataclass(frozen=True, slots=True)
class Policy:
    """The defaults and the rules in order (first match wins)."""

    defaults: Grant = Grant()
    rules: tuple[Rule, ...] = ()
    source: str = "(no policy)"

    def grant_for(self, uid: int, gids: Iterable[int] = ()) -> Grant:
        gids = frozenset(gids)
        for rule in self.rules:
            if rule.matches(uid, gids):
                return rule.grant
        if uid != ROOT_UID:
            return self.defaults
        if self.defaults.compute_share == DEFAULT_SHARE:
            return ROOT_GRANT
        return replace(ROOT_GRANT, compute_share=self.defaults.compute_share)

    def describe(self) -> str:
        """One line for the daemon's start-up output."""
        d = self.defaults
        adapters = "all" if d.adapters is None else "[" + ", ".join(map(str, d.adapters)) + "]"

        def size(n: int | None) -> str:
            return "no limit" if n is None else format_size(n)

        rules = f"{len(self.rules)} rule{'' if len(self.rules) == 1 else 's'}"
        return (f"policy: {self.source}: {rules}; defaults: adapters {adapters}, "
                f"{size(d.memory_per_process)} per process, {size(d.memory_per_uid)} per uid, "
                f"compute share {d.compute_share} (root: only rules that name it)")

    @property
    def grants(self) -> tuple[Grant, ...]:
        return (self.defaults, *(r.grant for r in self.rules))

    @property
    def needs_host_index(self) -> bool:
        """Whether a grant names adapters by their number on a host (the guest then asks each
        adapter's host for it as the adapter starts)."""
        return any(g.needs_host_index for g in self.grants)

    @property
    def has_memory_quotas(self) -> bool:
        return any(g.memory_per_process is not None or g.memory_per_uid is not None
                   for g in self.grants)

    @property
    def has_compute_shares(self) -> bool:
        """Whether some grant weighs other than the default (the hosts are then told every
        process's share)."""
        return any(g.compute_share != DEFAULT_SHARE for g in self.grants)


# ---- a process restricting itself ----------------------------------------------------------------

RESTRICT_KEYS = frozenset({"adapters", "memory", "compute"})
MAX_RESTRICT_LUIDS = 64
_LUID_MAX = (1 << 64) - 1
_MEMORY_MAX = 1 << 62  # (as dxg.runtime.sizes: more than any machine has)


class RestrictError(ValueError):
    """A restriction request that cannot be used; the text says which key and why."""


def _shown(value: Any) -> str:
    """A hostile value, short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _restrict_luids(value: Any) -> frozenset[int]:
    if not isinstance(value, list | tuple):
        raise RestrictError(f"adapters: {_shown(value)} is not a list of adapter LUIDs")
    if len(value) > MAX_RESTRICT_LUIDS:
        raise RestrictError(f"adapters: {len(value)} LUIDs; at most {MAX_RESTRICT_LUIDS}")
    for v in value:
        if not _is_int(v) or not 0 <= v <= _LUID_MAX:
            raise RestrictError(f"adapters: {_shown(v)} is not a LUID (an integer 0..2**64-1)")
    return frozenset(value)


def _restrict_memory(value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= _MEMORY_MAX:
        raise RestrictError(f"memory: {_shown(value)} is not a size in bytes "
                            f"(an integer 0..2**62)")
    return value


def _restrict_fraction(value: Any) -> float:
    ok = (_is_int(value) or isinstance(value, float)) and 0 < value <= 1
    if not ok:  # (NaN compares false: refused here too; inf is above 1)
        raise RestrictError(f"compute: {_shown(value)} is not a fraction 0 < f <= 1")
    return float(value)


def restrict_grant(grant: Grant, request: Mapping[str, Any]) -> Grant:
    """``grant`` lowered by what a process asks for itself (``request``: "adapters", a list of
    guest LUIDs; "memory", bytes per adapter; "compute", a fraction of its share; and "op"
    if given must be "restrict"). Only ever lower: adapters intersect, memory and share take
    the minimum, so calls compose. RestrictError (one line) for anything malformed."""
    if not isinstance(request, Mapping):
        raise RestrictError("a restriction is a JSON object")
    for key in request:
        if key == "op":
            if request[key] != "restrict":
                raise RestrictError(f"op: {_shown(request[key])} is not 'restrict'")
        elif key not in RESTRICT_KEYS:
            raise RestrictError(f"unknown key {_shown(key)} (known: "
                                f"{', '.join(sorted(RESTRICT_KEYS))})")
    g = grant
    if "adapters" in request:
        luids = _restrict_luids(request["adapters"])
        g = replace(g, only_luids=luids if g.only_luids is None else g.only_luids & luids)
    if "memory" in request:
        memory = _restrict_memory(request["memory"])
        current = g.memory_per_process
        g = replace(g, memory_per_process=memory if current is None else min(current, memory))
    if "compute" in request:
        f = _restrict_fraction(request["compute"])
        share = g.compute_share
        g = replace(g, compute_share=min(share, max(DEFAULT_SHARE, round(share * f))))
    return replace(g, restricted=True)


# ---- parsing -------------------------------------------------------------------------------------


def _fail(where: str, what: str) -> PolicyError:
    return PolicyError(f"{where}: {what}" if where else what)


def _size(value: Any, where: str) -> int | None:
    if isinstance(value, str) and value.strip().lower() == _UNLIMITED:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise _fail(where, f'{e}, or "{_UNLIMITED}"') from None


def _share(value: Any, where: str) -> int:
    if (isinstance(value, int) and not isinstance(value, bool)
            and DEFAULT_SHARE <= value <= MAX_SHARE):
        return value
    raise _fail(where, f"{value!r} is not a compute share (use {SHARE_HELP})")


def parse_share(text: str) -> int:
    """A compute share from a flag's text (ValueError with the fix)."""
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not DEFAULT_SHARE <= value <= MAX_SHARE:
        raise ValueError(f"{text!r} is not a compute share (use {SHARE_HELP})")
    return value


def _adapter_ref(value: Any, where: str) -> AdapterRef:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 16:
        return AdapterRef(index=value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith("0x"):
            try:
                luid = int(text, 16)
            except ValueError:
                luid = -1
            if 0 < luid < 1 << 64:
                return AdapterRef(luid=luid)
        elif m := _HOST_INDEX.fullmatch(text):
            return AdapterRef(host=int(m[1]), index=int(m[2]))
    raise _fail(where, f"{value!r} is not an adapter (use {_ADAPTER_HELP})")


def _adapters(value: Any, where: str) -> tuple[AdapterRef, ...] | None:
    if isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return None if value.strip().lower() == "all" else ()
    if not isinstance(value, list):
        raise _fail(where, f'{value!r} is not "all", "none" or a list of adapters')
    return tuple(_adapter_ref(v, f"{where}[{i}]") for i, v in enumerate(value))


def _ids(value: Any, where: str, kind: str) -> frozenset[int]:
    """uids or gids from numbers and names (names must exist on this machine)."""
    if not isinstance(value, list):
        value = [value]
    out = set()
    for i, v in enumerate(value):
        here = f"{where}[{i}]"
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32:
            out.add(v)
        elif isinstance(v, str) and v.strip():
            try:
                out.add(pwd.getpwnam(v).pw_uid if kind == "user" else grp.getgrnam(v).gr_gid)
            except KeyError:
                raise _fail(here, f"no {kind} named {v!r} on this machine") from None
        else:
            raise _fail(here, f"{v!r} is not a {kind} name or id")
    return frozenset(out)


def _table(value: Any, where: str, known: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be a table")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return value


def _grant(table: Mapping[str, Any], where: str, base: Grant, rule: str) -> Grant:
    """``base`` with what ``table`` sets."""
    g = replace(base, rule=rule)
    if "adapters" in table:
        g = replace(g, adapters=_adapters(table["adapters"], f"{where}.adapters"))
    for key in ("memory_per_process", "memory_per_uid"):
        if key in table:
            g = replace(g, **{key: _size(table[key], f"{where}.{key}")})
    if "compute_share" in table:
        g = replace(g, compute_share=_share(table["compute_share"], f"{where}.compute_share"))
    return g


def parse_policy(text: str, source: str = "policy", *,
                 memory_per_process: int | None = None,
                 memory_per_uid: int | None = None,
                 compute_share: int | None = None) -> Policy:
    """A policy from TOML text. The keyword arguments (the flags) replace the defaults' values
    before the rules inherit them. PolicyError says where and what to fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    return _build(data, source, memory_per_process, memory_per_uid, compute_share)


def load_policy(path: str | Path | None, *, memory_per_process: int | None = None,
                memory_per_uid: int | None = None,
                compute_share: int | None = None) -> Policy:
    """The policy in ``path`` (None: only the flags' defaults)."""
    if path is None:
        return _build({}, "(flags)", memory_per_process, memory_per_uid, compute_share)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PolicyError(f"cannot read the policy file {path}: {reason}") from None
    return parse_policy(text, str(path), memory_per_process=memory_per_process,
                        memory_per_uid=memory_per_uid, compute_share=compute_share)


def _build(data: Mapping[str, Any], source: str, memory_per_process: int | None,
           memory_per_uid: int | None, compute_share: int | None = None) -> Policy:
    def where(part: str) -> str:
        return f"{source}: {part}"

    _table(data, source, _TOP_KEYS)
    version = data.get("version", POLICY_VERSION)
    if version != POLICY_VERSION:
        raise _fail(where("version"), f"{version!r}: this pydxg reads version {POLICY_VERSION}")
    defaults = _grant(_table(data.get("defaults", {}), where("[defaults]"), _GRANT_KEYS),
                      where("[defaults]"), Grant(), "defaults")
    if memory_per_process is not None:
        defaults = replace(defaults, memory_per_process=memory_per_process)
    if memory_per_uid is not None:
        defaults = replace(defaults, memory_per_uid=memory_per_uid)
    if compute_share is not None:
        defaults = replace(defaults, compute_share=_share(compute_share, "--compute-share"))
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise _fail(where("rules"), "must be an array of tables: write each as [[rules]]")
    rules = []
    for i, raw in enumerate(raw_rules, 1):
        here = where(f"[[rules]] #{i}")
        table = _table(raw, here, _RULE_KEYS)
        name = table.get("name", f"rule {i}")
        if not isinstance(name, str):
            raise _fail(f"{here}.name", "must be a string")
        uids = _ids(table.get("uids", []), f"{here}.uids", "user")
        gids = _ids(table.get("groups", []), f"{here}.groups", "group")
        if not uids and not gids:
            raise _fail(here, "names nobody: give uids or groups (or both)")
        rules.append(Rule(name, uids, gids, _grant(table, here, defaults, name)))
    return Policy(defaults, tuple(rules), source)

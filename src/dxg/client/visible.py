"""``DXG_VISIBLE_ADAPTERS``: which adapters a client process sees, as ``CUDA_VISIBLE_DEVICES``
does for CUDA. Set by whoever starts the process (a container runtime from a CDI spec, a job
scheduler, a person) to hand it some of the node's adapters, not all.

The value is a comma-separated list of adapter indices (``0``, ``1``: positions in the full
enumeration this user gets from the node, what ``dxg ls`` numbers without the variable) and LUIDs
(``0x0000000100000002``, as ``dxg ls`` prints them). The client then enumerates only those, in
the order listed, renumbered from 0 (``DXG_VISIBLE_ADAPTERS=1`` makes adapter 1 the process's
``dxg.compute.device(0)``), and opens no other by LUID. An entry that names no adapter of the
node is skipped; an empty value (or ``none``) leaves no adapter; unset or ``all``: every one.
This is a convenience for cooperating processes, not a security boundary: the guest's policy
(docs/policy.md) decides what a user may reach."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["VISIBLE_ENV", "Visible", "parse_visible", "visible_from_env"]

VISIBLE_ENV = "DXG_VISIBLE_ADAPTERS"


@dataclass(frozen=True, slots=True)
class Visible:
    """A parsed ``DXG_VISIBLE_ADAPTERS``: its entries in order, each ``("index", n)`` or
    ``("luid", n)``."""

    entries: tuple[tuple[str, int], ...]

    @property
    def luids_only(self) -> bool:
        """Whether every entry is a LUID (then no enumeration is needed to check one)."""
        return all(kind == "luid" for kind, _ in self.entries)

    def select(self, adapters: Sequence[Any]) -> list[int]:
        """Positions in ``adapters`` (the full enumeration, objects with ``.luid``) that are
        visible, in the order the entries name them, each once."""
        out: list[int] = []
        for kind, value in self.entries:
            if kind == "index":
                pos = value if value < len(adapters) else -1
            else:
                pos = next((i for i, a in enumerate(adapters) if a.luid == value), -1)
            if pos >= 0 and pos not in out:
                out.append(pos)
        return out

    def names_luid(self, luid: int) -> bool:
        return ("luid", luid) in self.entries


def parse_visible(text: str) -> Visible | None:
    """``DXG_VISIBLE_ADAPTERS``'s value; None: every adapter. Raises ValueError naming the
    entry that is neither an index nor a LUID, and what to write."""
    value = text.strip()
    if value.lower() == "all":
        return None
    if value == "" or value.lower() == "none":
        return Visible(())
    entries: list[tuple[str, int]] = []
    for raw in value.split(","):
        item = raw.strip()
        try:
            if item.lower().startswith("0x"):
                entries.append(("luid", int(item, 16)))
            elif item.isdigit():
                entries.append(("index", int(item)))
            else:
                raise ValueError(item)
        except ValueError:
            raise ValueError(f"{VISIBLE_ENV}={text!r}: {item!r} is not an adapter index or LUID "
                             "(write indices and LUIDs as `dxg ls` prints them, e.g. 0,1 or "
                             "0x0000000100000002)") from None
    return Visible(tuple(entries))


def visible_from_env(environ: Mapping[str, str] | None = None) -> Visible | None:
    """The restriction ``DXG_VISIBLE_ADAPTERS`` sets in ``environ`` (default: this process's
    environment), read when a node is opened; None when unset."""
    env = os.environ if environ is None else environ
    text = env.get(VISIBLE_ENV)
    return None if text is None else parse_visible(text)

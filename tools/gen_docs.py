#!/usr/bin/env python3
"""Regenerate the parts of docs/ that come from the code, between their markers:

* docs/protocol.md  ``<!-- command-table -->``: the guest<->host command table
  (``dxg.protocol.table.render_command_table``);
* docs/ioctls.md: the whole file (``dxg.node.support``);
* docs/libdxg.md  ``<!-- ioctl-table:begin -->``: the ioctls through the FUSE file
  (``dxg.node.support``).

    python tools/gen_docs.py [--check]

``--check`` writes nothing and exits 1 when a file is stale (the tests run it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def between(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def targets() -> list[tuple[Path, Callable[[str], str]]]:
    from dxg.node import support
    from dxg.protocol.table import render_command_table

    return [
        (ROOT / "docs/protocol.md",
         lambda t: between(t, "command-table", render_command_table())),
        (ROOT / "docs/ioctls.md", lambda t: support.render_ioctls_doc()),
        (ROOT / "docs/libdxg.md", support.update_libdxg_doc),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for path, render in targets():
        old = path.read_text(encoding="utf-8")
        new = render(old)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'regenerated'}: {path.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

"""What paravirtualization costs, every part side by side with its baseline, in one run: the
same thing as ``dxg bench`` (src/dxg/bench), for those who run the scripts of this folder.

    .venv/bin/python bench/paravirt.py [--quick] [--json FILE] [--only M1,M3] [--skip M4]
                                       [--no-peer]

See docs/performance.md for what each figure means and how to read the ratios.
"""

from __future__ import annotations

import sys

from dxg.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())

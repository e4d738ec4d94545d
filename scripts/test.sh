#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite (real processes, sockets,
# FUSE mounts and a C compiler; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests tools bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite (real processes, sockets,
# FUSE mounts, a C compiler and a Ray cluster in a network namespace; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYDXG_EXTRAS=dev,ray bash scripts/setup.sh
.venv/bin/ruff check src tests tools bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

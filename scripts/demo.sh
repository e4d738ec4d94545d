#!/usr/bin/env bash
# The main job: set everything up, start the embedded default (`dxg up`: one host with two CPU
# soft adapters, one guest driver, its node, all on this machine), list the adapters, and run
# `dxg demo` (three client processes at once), then stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DXG_NODE="${DXG_NODE:-$(mktemp -d /tmp/pydxg-demo.XXXXXX)/dxg.sock}"
.venv/bin/dxg up --adapters 2 &
up=$!
trap 'kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true' EXIT
.venv/bin/dxg wait --adapters 2 --timeout 60
echo "\$ dxg ls"
.venv/bin/dxg ls
echo "\$ dxg demo"
.venv/bin/dxg demo

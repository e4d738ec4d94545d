#!/usr/bin/env bash
# The main job: set everything up, start the embedded default (`dxg up`: one host with two CPU
# soft adapters, one guest driver, its node, all on this machine), list the adapters, and run
# `dxg demo` (three client processes at once), then stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DXG_NODE="${DXG_NODE:-$(mktemp -d /tmp/pydxg-demo.XXXXXX)/dxg.sock}"
log="$(dirname "$DXG_NODE")/dxg-up.log"
echo "\$ dxg up --adapters 2    (node $DXG_NODE, log $log)"
.venv/bin/dxg up --adapters 2 >"$log" 2>&1 &
up=$!
trap 'kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true' EXIT
if ! .venv/bin/dxg wait --adapters 2 --timeout 60; then
  echo "dxg up did not come up; its log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
echo "\$ dxg ls"
.venv/bin/dxg ls
echo "\$ dxg demo"
.venv/bin/dxg demo

#!/usr/bin/env bash
# Sets up everything pydxg needs on a Debian machine: system packages (fuse3, a C compiler, tmux),
# a virtualenv inside the repo (.venv) with the pinned Python dependencies, and the package itself.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# fuse3: /dev/fuse tooling and fusermount3 (the FUSE node speaks the kernel protocol itself)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
# tmux: the tests run `dxg top` in a real terminal (80x24) inside it
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then need_apt+=(python3 python3-venv); PY=python3; fi
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -qq </dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" </dev/null >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
# PYDXG_EXTRAS: the optional dependency sets to install (pyproject.toml); the tests also need
# Ray (scripts/test.sh asks for dev,ray).
extras=${PYDXG_EXTRAS:-dev}
stamp=".venv/.pydxg-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv ($extras)"
  .venv/bin/python -m pip install -q --upgrade pip </dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]" </dev/null
  touch "$stamp"
fi

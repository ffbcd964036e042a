#!/usr/bin/env bash
# Sets up what the test suite needs on a fresh Debian/Ubuntu machine, then runs it:
# system packages (redis-server: the tests start their own), the venv, ruff, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)  # the dashboard tests drive it headless
command -v bwrap >/dev/null || missing+=(bubblewrap)  # the runner's sandbox (workers/sandbox.py)
# OpenBLAS for MLX's CPU matmuls in the sweep and on runners (checks/mlx_side.py)
compgen -G "/usr/lib/*-linux-gnu/openblas-serial/libopenblas.so.0" >/dev/null \
  || missing+=(libopenblas0-serial)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

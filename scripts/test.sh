#!/usr/bin/env bash
# Sets up what the test suite needs on a fresh Debian/Ubuntu machine, then runs it:
# system packages (redis-server: the tests start their own), the venv from the validated
# lock, ruff, pytest. With no arguments it then runs the drift set (the clean
# architectures and the injected bugs) again under the lowest supported transformers
# (constraints/lowest.txt) and under the newest release on the package index when that
# installs and is newer than the lock, and fails when any verdict row differs.
# With arguments, only `pytest ARGS` runs.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)  # the dashboard tests drive it headless
# OpenBLAS for MLX's CPU matmuls in the sweep and on runners (checks/mlx_side.py)
compgen -G "/usr/lib/*-linux-gnu/openblas-serial/libopenblas.so.0" >/dev/null \
  || missing+=(libopenblas0-serial)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

install() {  # venv dir, constraints file, extra pip arguments...
  local venv=$1 lock=$2
  shift 2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -c "$lock" -e '.[dev]' "$@" 2>&1 \
    | grep -v '^WARNING: Location' || true
}

install .venv constraints/lock.txt
.venv/bin/ruff check .
if (($#)); then
  exec .venv/bin/python -m pytest "$@"
fi

mkdir -p artifacts
rm -f artifacts/verdicts-*.jsonl
DRIFT_TESTS=(tests/test_parity.py tests/test_bug_injection.py)
MLX_VERIFY_VERDICT_LOG=artifacts/verdicts-lock.jsonl .venv/bin/python -m pytest

drift() {  # name, venv: the drift set there, compared with the lock's verdicts
  local name=$1 venv=$2
  echo "== drift set under $("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)') ($name)"
  MLX_VERIFY_VERDICT_LOG="artifacts/verdicts-$name.jsonl" "$venv/bin/python" -m pytest -q \
    "${DRIFT_TESTS[@]}"
  .venv/bin/python scripts/compare_verdicts.py artifacts/verdicts-lock.jsonl \
    "artifacts/verdicts-$name.jsonl" "${DRIFT_TESTS[@]}"
}

install .venv-lowest constraints/lowest.txt
drift lowest .venv-lowest

# The newest transformers on the index, when it is newer than the lock and installs:
# a release that changes a verdict is seen here before the lock moves to it.
locked=$(sed -n -E 's/^transformers==([^ ]+).*/\1/p' constraints/lock.txt)
newest=$(.venv/bin/pip index versions transformers 2>/dev/null | sed -n -E 's/^transformers \((.*)\)$/\1/p')
if [ -n "$newest" ] && [ "$newest" != "$locked" ]; then
  if .venv/bin/pip install -q --dry-run "transformers==$newest" >artifacts/newest.log 2>&1; then
    install .venv-newest constraints/lock.txt
    .venv-newest/bin/pip install -q "transformers==$newest" >>artifacts/newest.log 2>&1
    drift newest .venv-newest
  else
    echo "== transformers $newest, the newest on the index, does not install here; the lock stays at $locked: $( (grep -m1 -E "ERROR" artifacts/newest.log || tail -1 artifacts/newest.log) | cut -c1-240)"
  fi
else
  echo "== transformers $locked in the lock is the newest on the index"
fi

#!/usr/bin/env bash
# Regenerates the validated locks in constraints/ with pip-tools' pip-compile (the
# standard resolver for pip constraints files), from pyproject.toml's ranges:
#   constraints/lock.txt    the newest releases the ranges allow: what runners, CI and
#                           README command 1 install
#   constraints/lowest.txt  the same, with the lowest supported transformers: CI runs
#                           the clean set and the injected bugs under both and compares
# Run it, then the test suite (bash scripts/test.sh), then commit both files together;
# docs/deploy.md ("Moving the lock forward") has the whole procedure.
set -euo pipefail
cd "$(dirname "$0")/.."
LOWEST_TRANSFORMERS="${LOWEST_TRANSFORMERS:-5.23.0}"

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check 'pip-tools>=7.4,<8'

compile() {  # output file, extra requirement files...
  local out=$1
  shift
  "$tools/venv/bin/pip-compile" --quiet --all-extras --strip-extras --no-header \
    --no-emit-index-url --no-emit-find-links --annotation-style=line \
    -o "$out" pyproject.toml "$@"
  # One file for Linux and macOS: torch's local +cpu tag and mlx's platform marker go
  # (==2.13.0 still takes the CPU build on Linux; mlx-cpu is only installed on Linux).
  sed -i -E -e 's/^torch==([0-9.]+)\+cpu/torch==\1/' -e 's/^(mlx==[0-9.]+) ; [^#]*/\1  /' "$out"
}

compile constraints/lock.txt
echo "transformers==${LOWEST_TRANSFORMERS}" > "$tools/lowest.in"
compile constraints/lowest.txt "$tools/lowest.in"
grep -E '^(transformers|mlx|mlx-lm|torch)==' constraints/lock.txt constraints/lowest.txt

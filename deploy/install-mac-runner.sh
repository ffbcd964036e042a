#!/usr/bin/env bash
# Installs a Mac runner for the current user as a launchd agent.
#   REDIS_URL=rediss://... [GITHUB_GIT_URL=https://github.com] [QUEUE=verify] \
#     bash deploy/install-mac-runner.sh
# Run it as a dedicated, unprivileged macOS user: PR code runs under that account.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REDIS_URL:?set REDIS_URL (the queue the server uses)}"
GITHUB_GIT_URL="${GITHUB_GIT_URL:-https://github.com}"
QUEUE="${QUEUE:-verify}"
SUPPORT="$HOME/Library/Application Support/mlx-verify"
WORK_DIR="$SUPPORT/jobs"
LOG_DIR="$HOME/Library/Logs/mlx-verify"
VENV="$SUPPORT/venv"
mkdir -p "$WORK_DIR" "$LOG_DIR"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c constraints/lock.txt .  # the validated lock

PLIST="$HOME/Library/LaunchAgents/org.mlx-verify.runner.plist"
mkdir -p "$(dirname "$PLIST")"
sed -e "s|@VENV@|$VENV|g" -e "s|@QUEUE@|$QUEUE|g" -e "s|@REDIS_URL@|$REDIS_URL|g" \
    -e "s|@GITHUB_GIT_URL@|$GITHUB_GIT_URL|g" -e "s|@WORK_DIR@|$WORK_DIR|g" \
    -e "s|@LOG_DIR@|$LOG_DIR|g" deploy/org.mlx-verify.runner.plist > "$PLIST"
chmod 600 "$PLIST"  # it holds the Redis password
launchctl bootout "gui/$(id -u)" "$PLIST" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$PLIST"
echo "runner installed: queue $QUEUE, logs in $LOG_DIR/runner.log"

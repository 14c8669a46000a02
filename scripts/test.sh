#!/usr/bin/env bash
# Install (first run only) and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# Headless Chromium for the gallery render test (tests/test_evaluation.py skips without it):
# installed once, only as root with apt-get; a failure is ignored.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[stepvideo] installing chromium for the gallery test ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "[stepvideo] chromium not installed; the gallery render test will be skipped" >&2
fi
exec "$STEPVIDEO_PY" -m pytest -q --timeout 600 "$@" tests

#!/usr/bin/env bash
# Install (first run only) and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]
# Installs nothing outside ./.venv. The gallery render test and the generation server's page
# test need a headless Chromium (/usr/bin/chromium, and /usr/bin/chromedriver for the page) and
# are skipped, with the reason, without them. To let this script install Debian's chromium and
# chromium-driver system-wide (as root, with apt-get), opt in:
#   STEPVIDEO_INSTALL_BROWSER=1 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ "${STEPVIDEO_INSTALL_BROWSER:-0}" = 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[stepvideo] STEPVIDEO_INSTALL_BROWSER=1: installing Debian's chromium and chromium-driver system-wide (apt-get) ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
            || echo "[stepvideo] chromium not installed; the gallery render and page tests will be skipped" >&2
    else
        echo "[stepvideo] STEPVIDEO_INSTALL_BROWSER=1 needs root and apt-get; the gallery render and page tests will be skipped" >&2
    fi
fi
exec "$STEPVIDEO_PY" -m pytest -q --timeout 600 "$@" tests

#!/usr/bin/env bash
# Install (first run only) and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]
# Installs nothing outside ./.venv. The gallery render tests and the generation server's page
# test need a headless Chromium (/usr/bin/chromium, and /usr/bin/chromedriver for the page) and
# are skipped, with the reason, without them; the Chinese-text checks also need a CJK font. To let
# this script install Debian's chromium, chromium-driver and fonts-noto-cjk system-wide (as root,
# with apt-get), opt in:
#   STEPVIDEO_INSTALL_BROWSER=1 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
_browser_packages=()
[ -x /usr/bin/chromium ] || _browser_packages+=(chromium)
[ -x /usr/bin/chromedriver ] || _browser_packages+=(chromium-driver)
[ -n "$(fc-list :lang=zh 2>/dev/null | head -n 1)" ] || _browser_packages+=(fonts-noto-cjk)
if [ "${STEPVIDEO_INSTALL_BROWSER:-0}" = 1 ] && [ "${#_browser_packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[stepvideo] STEPVIDEO_INSTALL_BROWSER=1: installing ${_browser_packages[*]} system-wide (apt-get) ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${_browser_packages[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${_browser_packages[@]}" >/dev/null 2>&1; } \
            || echo "[stepvideo] ${_browser_packages[*]} not installed; the browser tests may be skipped or fail" >&2
    else
        echo "[stepvideo] STEPVIDEO_INSTALL_BROWSER=1 needs root and apt-get; the browser tests will be skipped" >&2
    fi
fi
exec "$STEPVIDEO_PY" -m pytest -q --timeout 600 "$@" tests

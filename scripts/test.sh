#!/usr/bin/env bash
# Install (first run only) and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$STEPVIDEO_PY" -m pytest -q --timeout 600 "$@" tests

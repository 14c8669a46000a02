# Source this file: it selects (or creates) the Python environment for stepvideo and exports
# STEPVIDEO_PY. Used by scripts/test.sh and scripts/demo.sh.
#
# Order: $STEPVIDEO_PY if set; an active virtualenv that already has torch and stepvideo;
# otherwise ./.venv, created on first use with the pinned CPU torch (constraints-ci.txt),
# so a fresh machine never downloads the multi-GB CUDA build.
_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_stepvideo_env_ok() {
    "$1" -c "import torch, stepvideo, safetensors, sentencepiece, transformers, flask, waitress, imageio_ffmpeg, prometheus_client, openai, selenium, diffusers" >/dev/null 2>&1
}

if [ -n "${STEPVIDEO_PY:-}" ]; then
    :
elif [ -n "${VIRTUAL_ENV:-}" ] && _stepvideo_env_ok "$VIRTUAL_ENV/bin/python"; then
    STEPVIDEO_PY="$VIRTUAL_ENV/bin/python"
else
    STEPVIDEO_PY="$_repo_root/.venv/bin/python"
    if ! { [ -x "$STEPVIDEO_PY" ] && _stepvideo_env_ok "$STEPVIDEO_PY"; }; then
        echo "[stepvideo] setting up $_repo_root/.venv (CPU torch pinned by constraints-ci.txt) ..." >&2
        python3 -m venv "$_repo_root/.venv" || return 1 2>/dev/null || exit 1
        "$STEPVIDEO_PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
        "$STEPVIDEO_PY" -m pip install -q --disable-pip-version-check -c "$_repo_root/constraints-ci.txt" \
            -e "$_repo_root[test]" >&2 || { echo "[stepvideo] install failed" >&2; return 1 2>/dev/null || exit 1; }
    fi
fi
export STEPVIDEO_PY

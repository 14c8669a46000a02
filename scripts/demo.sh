#!/usr/bin/env bash
# The main job. With no weights it runs the whole decoupled system on the built-in tiny model
# on CPU (service + 2 torchrun ranks with Ulysses SP) and prints the written mp4's path last.
#   bash scripts/demo.sh                       # tiny model, CPU, a few minutes incl. set-up
#   bash scripts/demo.sh --model_dir ckpts --nproc 4 --prompt "..."   # real checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$STEPVIDEO_PY" -m stepvideo.cli.demo "$@"

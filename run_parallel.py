r"""Generate one video with the Step-Video DiT under torchrun (shim for ``stepvideo.cli.generate``).

    torchrun --nproc_per_node 4 run_parallel.py --model_dir ckpts --ulysses_degree 4 \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 --prompt "..."

Same flags as ``torchrun -m stepvideo.cli.generate`` and the ``stepvideo-generate`` console script.
"""
import sys

from stepvideo.cli.generate import build_parser, main  # noqa: F401  (build_parser: for --help tests)

if __name__ == "__main__":
    sys.exit(main(prog="run_parallel.py"))

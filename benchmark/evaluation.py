r"""Generate a video for every prompt of an evaluation set (shim for ``stepvideo.cli.evaluate``).

    torchrun --nproc_per_node 8 benchmark/evaluation.py --model_dir ckpts \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 \
        --prompts t2v-eval --save_path results/t2v-eval [--shard 0/4]

Same flags as ``torchrun -m stepvideo.cli.evaluate`` and the ``stepvideo-eval`` console script.
See docs/evaluation.md.
"""
import sys

from stepvideo.cli.evaluate import build_parser, main  # noqa: F401  (build_parser: for --help tests)

if __name__ == "__main__":
    sys.exit(main(prog="benchmark/evaluation.py"))

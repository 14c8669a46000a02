r"""Generate one video with the Step-Video DiT, split across the ranks of a torchrun launch.

    torchrun --nproc_per_node 4 run_parallel.py --model_dir ckpts --ulysses_degree 4 \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 --prompt "..."
    torchrun --nproc_per_node 4 -m stepvideo.cli.generate ...      # the same, installed package
    torchrun --nproc_per_node 1 run_parallel.py --no_service --model_dir ckpts --prompt "..."

Flags are the reference's (plus --preset, --no_service, --seed, --output_path, ...). Before any
weight is read, rank 0 checks the services, the output path, the first image, the checkpoint
kind and the sampling settings; a failure on any rank ends every rank with the same one-line
error and exit code 2. Rank 0 prints the written mp4's path as its last line of output.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Optional, Sequence

from ..errors import UserError
from ..job_server.launch import add_serve_args, serve
from ..parallel.agree import on_main
from ..process import run_main, run_ranks, watch_launcher
from ..runtime.generator import VideoGenerator
from ..runtime.preflight import preflight
from .args import (add_model_args, add_output_args, add_parallel_args, add_sampling_args, configure_logging,
                   start_ranks, token_count)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser)
    add_output_args(parser)
    add_parallel_args(parser)
    add_serve_args(parser)
    return parser


def generate(args: argparse.Namespace) -> int:
    watch_launcher()                     # under torchrun: exit if the launcher dies
    if not args.prompt:
        raise UserError("--prompt is required")
    (sampling, output, parallel, runtime), state = start_ranks(args)

    def work():
        on_main(state, lambda: preflight(runtime, sampling, output, parallel, first_image=args.first_image_path,
                                         prompt=args.prompt))
        generator = VideoGenerator(runtime, state, sequence_tokens=token_count(sampling))
        return generator.generate(args.prompt, sampling, output, first_image=args.first_image_path)

    result = run_ranks(state, work, args.debug)
    if result is not None and result.path is not None:
        print(f"Saved the generated video in {result.path}", file=sys.stderr)
        print(result.path)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging()
    if args.serve:                      # the persistent generation server (docs/server.md)
        return run_main(partial(serve, args, start_ranks), debug=args.debug)
    return run_main(partial(generate, args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

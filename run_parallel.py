"""Generate one video with the Step-Video DiT, split across the ranks of a torchrun launch.

    torchrun --nproc_per_node 4 run_parallel.py --model_dir ckpts --ulysses_degree 4 \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 --prompt "..."

Flags are the reference's (plus --preset, --local, --seed, --output_path, ...). Rank 0 prints
the written mp4's path as its last line of output.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from stepvideo import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_output_args(parser)
    cli.add_parallel_args(parser)
    from stepvideo.serving.launch import add_serve_args
    add_serve_args(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging()
    if args.serve:                      # the persistent generation server (docs/server.md)
        from stepvideo.serving.launch import serve
        return serve(args)
    if not args.prompt:
        print("error: --prompt is required", file=sys.stderr)
        return 2
    try:
        sampling, output, parallel, runtime = cli.launch_configs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from stepvideo.parallel.state import ParallelState
    from stepvideo.runtime import GenerationError, VideoGenerator

    try:
        state = ParallelState.from_env(parallel)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        generator = VideoGenerator(runtime, state, sequence_tokens=cli.token_count(sampling))
        result = generator.generate(args.prompt, sampling, output, first_image=args.first_image_path)
    except (ValueError, FileNotFoundError, GenerationError) as err:
        print(f"error (rank {state.rank}): {err}", file=sys.stderr)
        return 2
    finally:
        state.destroy()
    if result is not None and result.path is not None:
        print(f"Saved the generated video in {result.path}", file=sys.stderr)
        print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

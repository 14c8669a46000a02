"""Generate a video for every prompt of an evaluation set with one loaded model.

    torchrun --nproc_per_node 8 benchmark/evaluation.py --model_dir ckpts \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 \
        --prompts t2v-eval --save_path results/t2v-eval [--shard 0/4] [--limit N] [--ids 001 017]

Model, sampling (presets), output and parallel flags are run_parallel.py's. The run resumes:
items with a complete manifest line and an intact file are skipped. ``--gallery_only``
rebuilds index.html from the manifest(s) without loading anything. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from stepvideo import cli
from stepvideo.evaluation.sets import T2V_EVAL, T2V_EVAL_URL, parse_shard


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_sampling_args(parser, with_prompt=False)
    cli.add_output_args(parser)
    cli.add_parallel_args(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--prompts", default=T2V_EVAL,
                   help=f"{T2V_EVAL!r}, a TI2V-Eval folder (NNN.png + NNN.txt), a .jsonl, or a text file")
    g.add_argument("--prompts_url", default=T2V_EVAL_URL, help="where t2v-eval is downloaded from")
    g.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "stepvideo"),
                   help="download cache of the t2v-eval prompts")
    g.add_argument("--shard", default="0/1", help="i/n: this run takes items with (index-1) %% n == i")
    g.add_argument("--limit", type=int, default=None, help="at most N items (of this shard)")
    g.add_argument("--ids", nargs="+", default=None, help="only these item ids (e.g. 001 017)")
    g.add_argument("--categories", nargs="+", default=None,
                   help="only these categories (e.g. Sports '3D Animation'; case, spaces and _ do not matter)")
    g.add_argument("--save_latents", action="store_true",
                   help="also save each item's final latents beside its video (<video>.latents.safetensors)")
    g.add_argument("--gallery_only", action="store_true", help="rebuild index.html from the manifest and exit")
    g.add_argument("--no_gallery", action="store_true", help="do not write the gallery at the end")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = cli.configure_logging()
    from stepvideo.evaluation.gallery import build_gallery

    root = Path(args.save_path)
    if args.gallery_only:
        if rank == 0:
            try:
                print(build_gallery(root))
            except FileNotFoundError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return 0
    try:
        shard = parse_shard(args.shard)
        has_image = Path(args.prompts).is_dir() or None
        sampling, output, parallel, runtime = cli.launch_configs(args, has_image=bool(has_image))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from stepvideo.evaluation.runner import plan_on_main, run_items
    from stepvideo.parallel.state import ParallelState
    from stepvideo.runtime import VideoGenerator

    try:
        state = ParallelState.from_env(parallel)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        plan = plan_on_main(state, root, args.prompts, args.cache_dir, args.prompts_url, ids=args.ids,
                            shard=shard, limit=args.limit, motion_score=args.motion_score,
                            categories=args.categories)
        if state.is_main:
            logging.getLogger("evaluation").info("%d item(s) selected: %d to generate, %d already done",
                                                 plan.selected, len(plan.todo), len(plan.skipped))
        if plan.todo:
            generator = VideoGenerator(runtime, state, sequence_tokens=cli.token_count(sampling))
            summary = run_items(generator, plan, root, sampling, output, state, shard=shard,
                                save_latents=args.save_latents)
        else:
            from stepvideo.evaluation.runner import EvalSummary
            summary = EvalSummary(skipped=len(plan.skipped))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error (rank {state.rank}): {err}", file=sys.stderr)
        return 2
    finally:
        state.destroy()
    if state.is_main:
        if not args.no_gallery:
            print(f"gallery: {build_gallery(root)}", file=sys.stderr)
        print(summary.line())
    return 1 if summary.failed and state.is_main else 0


if __name__ == "__main__":
    sys.exit(main())

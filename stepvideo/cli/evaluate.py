r"""Generate a video for every prompt of an evaluation set with one loaded model.

    torchrun --nproc_per_node 8 benchmark/evaluation.py --model_dir ckpts \
        --vae_url http://127.0.0.1:8080 --caption_url http://127.0.0.1:8080 \
        --prompts t2v-eval --save_path results/t2v-eval [--shard 0/4] [--limit N] [--ids 001 017]
    torchrun --nproc_per_node 8 -m stepvideo.cli.evaluate ...     # the same, installed package

Model, sampling (presets), output and parallel flags are run_parallel.py's. The run resumes:
items with a complete manifest line and an intact file are skipped (also those finished by a
run with another --shard layout). One runner per output folder and shard: a second one
refuses. After --max_service_failures consecutive caption/VAE service failures the run stops
with a summary. --gallery_only rebuilds index.html from the manifest(s) without loading
anything. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..evaluation.gallery import build_gallery
from ..evaluation.runner import EvalSummary, OutputLock, plan_on_main, run_items
from ..evaluation.sets import T2V_EVAL, T2V_EVAL_URL, parse_shard
from ..parallel.agree import on_main
from ..process import run_main, run_ranks, watch_launcher
from ..runtime.generator import VideoGenerator
from ..runtime.preflight import check_kind, check_sampling, check_services
from .args import (add_model_args, add_output_args, add_parallel_args, add_sampling_args, configure_logging,
                   start_ranks, token_count)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser, with_prompt=False)
    add_output_args(parser)
    add_parallel_args(parser)
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
    g.add_argument("--max_service_failures", type=int, default=3,
                   help="stop after this many consecutive items failed on the caption/VAE service "
                        "(default %(default)s; 0 = never stop)")
    g.add_argument("--gallery_only", action="store_true", help="rebuild index.html from the manifest and exit")
    g.add_argument("--no_gallery", action="store_true", help="do not write the gallery at the end")
    return parser


def evaluate(args: argparse.Namespace) -> int:
    root = Path(args.save_path)
    rank = int(os.environ.get("RANK", "0"))
    if args.gallery_only:
        if rank == 0:
            print(build_gallery(root))
        return 0
    shard = parse_shard(args.shard)
    if args.max_service_failures < 0:
        raise ValueError(f"--max_service_failures must be >= 0, got {args.max_service_failures}")
    has_image = Path(args.prompts).is_dir()
    watch_launcher()                     # under torchrun: exit if the launcher dies (the lock goes with us)
    (sampling, output, parallel, runtime), state = start_ranks(args, has_image=has_image)
    summary = run_ranks(state, lambda: _run(args, root, shard, has_image, sampling, output, parallel, runtime, state),
                        args.debug)
    if state.is_main:
        if not args.no_gallery:
            print(f"gallery: {build_gallery(root)}", file=sys.stderr)
        print(summary.line())
    if summary.stopped:
        print(f"error: {summary.stopped}", file=sys.stderr)
        return 2
    return 1 if summary.failed and state.is_main else 0


def _run(args, root: Path, shard, has_image: bool, sampling, output, parallel, runtime, state):
    lock = OutputLock(root, shard)

    def preflight():
        check_sampling(sampling, parallel)
        check_kind(runtime.model_dir, has_image=has_image)
        lock.acquire()                      # before anything in the folder is touched
        check_services(runtime, needs_vae_encode=has_image)

    try:
        on_main(state, preflight)
        plan = plan_on_main(state, root, args.prompts, args.cache_dir, args.prompts_url, ids=args.ids,
                            shard=shard, limit=args.limit, motion_score=args.motion_score,
                            categories=args.categories)
        if state.is_main:
            logging.getLogger("evaluation").info("%d item(s) selected: %d to generate, %d already done",
                                                 plan.selected, len(plan.todo), len(plan.skipped))
        if not plan.todo:
            return EvalSummary(skipped=len(plan.skipped))
        generator = VideoGenerator(runtime, state, sequence_tokens=token_count(sampling))
        return run_items(generator, plan, root, sampling, output, state, shard=shard,
                         max_service_failures=args.max_service_failures, save_latents=args.save_latents)
    finally:
        lock.release()


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging()
    return run_main(lambda: evaluate(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

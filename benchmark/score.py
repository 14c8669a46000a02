"""Score one evaluation run: text-video alignment, temporal consistency, motion.

    python benchmark/score.py RUN [--metrics alignment temporal_consistency motion]
        [--clip_model OFA-Sys/chinese-clip-vit-base-patch16 | /path/to/local/dir] [--device cuda]

RUN is an output folder of benchmark/evaluation.py. Each finished item's ``scores`` are written
into its manifest line (atomically); ``RUN/scores.json`` and the printed table hold the means
per category. Rebuild the gallery afterwards (``benchmark/evaluation.py --save_path RUN
--gallery_only``) to see them there. See docs/quality.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from stepvideo.tool import add_debug_flag, run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    from stepvideo.quality.scores import DEFAULT_CLIP, METRICS

    parser = tool_parser(__doc__)
    parser.add_argument("run", help="evaluation output folder")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--clip_model", default=DEFAULT_CLIP,
                        help="Chinese-CLIP checkpoint: Hub repo id or local folder (transformers layout)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--ids", nargs="+", default=None, help="only these item ids")
    add_debug_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser().parse_args(argv), _score, (FileNotFoundError, ValueError, NotADirectoryError))


def _score(args) -> int:
    from stepvideo.quality.scores import score_run, summary_lines

    summary = score_run(args.run, args.metrics, checkpoint=args.clip_model, device=args.device,
                        dtype=args.dtype, ids=args.ids, progress=True)
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

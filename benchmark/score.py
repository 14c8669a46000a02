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
import logging
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from stepvideo.quality.scores import DEFAULT_CLIP, METRICS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="evaluation output folder")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--clip_model", default=DEFAULT_CLIP,
                        help="Chinese-CLIP checkpoint: Hub repo id or local folder (transformers layout)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--ids", nargs="+", default=None, help="only these item ids")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stepvideo.quality.scores import score_run, summary_lines

    try:
        summary = score_run(args.run, args.metrics, checkpoint=args.clip_model, device=args.device,
                            dtype=args.dtype, ids=args.ids, progress=True)
    except (FileNotFoundError, ValueError, NotADirectoryError) as err:
        if args.debug or os.environ.get("STEPVIDEO_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

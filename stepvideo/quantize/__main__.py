"""Command line of :func:`stepvideo.quantize.quantize_model_dir`.

    python -m stepvideo.quantize ./ckpts --out ./ckpts-fp8 [--format stepvideo|comfy] [--link hard|symlink|copy]

Prints the finished folder as the last line of stdout; failures are one ``error:`` line.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Optional, Sequence

from ..process import run_main
from ..loading.fp8_checkpoint import FORMATS
from .writer import LINK_MODES, quantize_model_dir

GIB = 1024 ** 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo.quantize",
                                description="Write a copy of a Step-Video model folder with the DiT's block "
                                            "linears in fp8 e4m3 (per-output-channel fp32 scales).")
    p.add_argument("model_dir", help="the bf16 model folder (official layout)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist); written beside it, "
                                                "then renamed into place when complete")
    p.add_argument("--format", default="stepvideo", choices=FORMATS,
                   help="scale tensor names: stepvideo (<layer>.weight_scale) or comfy (ComfyUI scaled fp8: "
                        "<layer>.scale_weight and a scaled_fp8 marker tensor)")
    p.add_argument("--link", default="hard", choices=LINK_MODES,
                   help="how the other files (VAE, text encoders, scheduler) are placed: hard links (a copy "
                        "across file systems), symlinks, or copies")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)      # a terminated run cleans up its partial folder too

    def work() -> int:
        r = quantize_model_dir(args.model_dir, args.out, args.format, link=args.link, progress=not args.no_progress)
        print(f"quantised {r.linears} block linears: DiT {r.source_bytes / GIB:.2f} GiB -> "
              f"{r.written_bytes / GIB:.2f} GiB in {r.seconds:.1f} s; peak host RSS {r.peak_rss_bytes / GIB:.2f} GiB "
              f"(largest source shard {r.largest_shard_bytes / GIB:.2f} GiB)")
        print(r.out_dir)
        return 0

    return run_main(work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""Compare two evaluation runs item by item: PSNR / SSIM / pixel differences / latents.

    python benchmark/compare.py RUN_A RUN_B [--out REPORT_DIR] [--worst 8]

RUN_A and RUN_B are output folders of benchmark/evaluation.py (their manifests); items are
matched by id and B is measured against A. Writes REPORT_DIR/report.json (per item ``psnr``,
``ssim``, ``identical``, ``max_abs_diff``, ``mean_abs_diff``, ``worst_frame``,
``latents_rel_l2``; PSNR of identical videos is ``Infinity``) and REPORT_DIR/index.html (both
videos side by side, heat maps of the worst items), and prints the per-category summary.
Exit code: 0 when every shared item was compared, 1 when some could not be read, 2 on bad input.
See docs/quality.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from stepvideo.tool import add_debug_flag, run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(__doc__)
    parser.add_argument("run_a", help="reference run folder (A)")
    parser.add_argument("run_b", help="run folder measured against A (B)")
    parser.add_argument("--out", default=None, help="report folder (default: RUN_B/compare)")
    parser.add_argument("--worst", type=int, default=8, help="heat maps for this many lowest-PSNR items")
    parser.add_argument("--device", default=None, help="where the metrics run (default: cuda if available, else cpu)")
    add_debug_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser().parse_args(argv), _compare, (FileNotFoundError, ValueError))


def _compare(args) -> int:
    from pathlib import Path

    import torch

    from stepvideo.quality.compare import compare_runs, summary_lines, write_report_json
    from stepvideo.quality.report_html import build_compare_page

    if args.worst < 0:
        raise ValueError(f"--worst must be >= 0, got {args.worst}")
    out = Path(args.out) if args.out else Path(args.run_b) / "compare"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    comparison = compare_runs(args.run_a, args.run_b, progress=True, device=device)
    page = build_compare_page(comparison, out, worst=args.worst)
    report = write_report_json(comparison, out)
    print("\n".join(summary_lines(comparison)))
    if comparison.only_in_a or comparison.only_in_b:
        print(f"not in both runs: A only {len(comparison.only_in_a)}, B only {len(comparison.only_in_b)}")
    print(f"report: {report}\npage: {page}")
    return 1 if any("error" in item for item in comparison.items) else 0


if __name__ == "__main__":
    sys.exit(main())

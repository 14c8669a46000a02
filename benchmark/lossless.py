"""Which speed options change the video: one prompt, one seed, the baseline and every option.

    python benchmark/lossless.py --model_dir ckpts --local [--dtype bf16] [--height 544 --width 992
        --num_frames 17 --infer_steps 10] [--options fp8 offload sp2] [--max_ranks 2] [--json table.json]

Takes run_parallel.py's model and sampling flags. Runs the baseline (``--dtype``,
``--attention_backend``), then each option that applies on this device (fp8, compile, the
other attention backends, VAE tiling, block offload, and on CPU the SP / TP / CFG layouts up to
``--max_ranks`` spawned gloo ranks) and prints: option, seconds (denoising), peak memory
(CUDA), psnr vs the baseline, max |diff|, identical, relative L2 of the final latents.
See docs/quality.md for the numbers and what they mean.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from stepvideo import cli
from stepvideo.tool import add_debug_flag, run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(__doc__)
    cli.add_model_args(parser)
    cli.add_sampling_args(parser, with_prompt=True)
    g = parser.add_argument_group("lossless")
    g.add_argument("--options", nargs="+", default=None,
                   help="only these options (default: every one that applies here), e.g. fp8 offload sp2")
    g.add_argument("--max_ranks", type=int, default=2, help="CPU: largest layout (spawned gloo ranks)")
    g.add_argument("--json", default=None, help="also write the table as JSON to this file")
    add_debug_flag(g)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser().parse_args(argv), _lossless,
                    (ValueError, FileNotFoundError, RuntimeError, NotADirectoryError))


def _lossless(args) -> int:
    from stepvideo.runtime.generator import RuntimeConfig
    from stepvideo.quality.lossless import DEFAULT_PROMPT, LosslessSetup, run_table, table_lines

    if args.max_ranks < 1:
        raise ValueError(f"--max_ranks must be >= 1, got {args.max_ranks}")
    sampling = cli.sampling_config(args, has_image=False)
    runtime = RuntimeConfig(model_dir=args.model_dir or "./ckpts", dtype=args.dtype,
                            attention_backend=args.attention_backend, local=args.local, vae_url=args.vae_url,
                            caption_url=args.caption_url, service_token=args.service_token)
    setup = LosslessSetup(runtime=runtime, sampling=sampling, prompt=args.prompt or DEFAULT_PROMPT,
                          max_ranks=args.max_ranks)
    rows = run_table(setup, args.options)
    print("\n".join(table_lines(rows)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"setup": {"model_dir": runtime.model_dir, "dtype": runtime.dtype,
                                 "sampling": sampling.to_dict()},
                       "rows": [r.to_dict() for r in rows]}, f, indent=1, allow_nan=True, ensure_ascii=False)
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

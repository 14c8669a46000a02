"""diffusers' training-free caches on the Step-Video DiT: work saved, time, and PSNR against no cache.

CPU, tiny random model (mechanics only: random weights say nothing about quality):

    python -m stepvideo.testing.tiny /tmp/tiny
    python benchmark/bench_cache.py --model_dir /tmp/tiny --dtype fp32 --height 64 --width 64 --num_frames 17 --steps 16

GPU, real checkpoint (the quality table of docs/quality.md):

    python benchmark/bench_cache.py --model_dir ckpts --device cuda --steps 50

One generation without a cache, then one per cache setting, all from the same noise (``--seed``)
and the same text embeddings (encoded once). For each it prints the DiT block evaluations per
video (a block whose forward really ran) and attention evaluations (self + cross attention really
computed), the denoising wall time and its ratio to no cache, and the PSNR / SSIM of the decoded
video against the no-cache video (``stepvideo.quality.metrics.compare_videos``, as
``benchmark/compare.py``). MagCache needs per-step ratios of the model: they are calibrated in
a first run with diffusers' calibrate mode (its printout is diffusers').

Default sweep: First-Block-Cache thresholds (0.03 is the WaveSpeed-fork Step-Video recipe),
TaylorSeer intervals, MagCache thresholds. TeaCache (the FastVideo v0 recipe, threshold 0.23) is
not in diffusers 0.38 and is not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_SWEEP = ("fbc:0.03,fbc:0.05,fbc:0.1,fbc:0.2,fbc:0.4,taylorseer:2,taylorseer:3,taylorseer:5,"
                 "mag:0.06,mag:0.12,mag:0.24")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="model dir (official layout) or Hub repo id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--prompt", default="一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=992)
    parser.add_argument("--num_frames", type=int, default=102)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caches", default=DEFAULT_SWEEP,
                        help="comma-separated: fbc:THRESHOLD, taylorseer:INTERVAL, mag:THRESHOLD (default %(default)s)")
    return parser


def cache_configs(text: str, mag_ratios, steps: int):
    """``fbc:0.03,mag:0.1`` -> ``[(label, diffusers config)]``."""
    from diffusers.hooks import MagCacheConfig

    from stepvideo.diffusers.cache import cache_config

    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition(":")
        if kind == "mag":
            configs.append((item, MagCacheConfig(threshold=float(value), num_inference_steps=steps,
                                                 mag_ratios=mag_ratios)))
        else:
            configs.append((item, cache_config(kind, float(value))))
    return configs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stepvideo.diffusers import StepVideoTextToVideoPipeline
    from stepvideo.diffusers.cache import calibrate_mag_ratios
    from stepvideo.loading.checkpoint import parse_dtype
    from stepvideo.perf.cache import BlockEvaluations
    from stepvideo.quality.metrics import compare_videos

    pipe = StepVideoTextToVideoPipeline.from_pretrained(args.model_dir, torch_dtype=parse_dtype(args.dtype))
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    stages = pipe._stages()
    embeds = dict(zip(("y", "y_mask", "clip_embedding"), stages.encode_prompt(args.prompt, "", "")))
    size = dict(height=args.height, width=args.width, num_frames=args.num_frames, num_inference_steps=args.steps)

    def generate():
        """-> (latents, block evaluations, attention evaluations, denoise seconds)."""
        counter = BlockEvaluations(pipe.transformer)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        latents = pipe(prompt_embeds=embeds, generator=torch.Generator(args.device).manual_seed(args.seed),
                       output_type="latent", **size).frames
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        counter.close()
        return latents, counter.blocks, counter.attention, seconds

    def decoded(latents):
        from stepvideo.io.frames import decoded_to_frames

        return decoded_to_frames(stages.decode(latents))

    generate()                                                     # warm-up (allocator, kernels)
    base, base_blocks, base_attention, base_s = generate()
    base_video = decoded(base)
    mag_ratios = calibrate_mag_ratios(pipe.transformer, generate, args.steps) if "mag:" in args.caches else None
    tokens = base.shape[1] * base.shape[3] * base.shape[4]
    print(f"bench_cache: {args.model_dir}, {args.dtype} on {args.device}, {args.num_frames}x{args.height}x"
          f"{args.width} ({tokens} tokens), {args.steps} steps, {len(pipe.transformer.transformer_blocks)} blocks")
    print("| cache | block evals / video | attention evals / video | denoise s | vs no cache | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|---|")
    print(f"| none | {base_blocks} | {base_attention} | {base_s:.2f} | 1.00x | inf | 1.000 |")
    for label, config in cache_configs(args.caches, mag_ratios, args.steps):
        pipe.transformer.enable_cache(config)
        try:
            latents, blocks, attention, seconds = generate()
        finally:
            pipe.transformer.disable_cache()
        result = compare_videos(base_video, decoded(latents))
        print(f"| {label} | {blocks} | {attention} | {seconds:.2f} | {base_s / seconds:.2f}x | "
              f"{result.psnr:.2f} | {result.ssim:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m stepvideo.vae {encode,decode,reconstruct}``: the Video-VAE without the DiT.

    python -m stepvideo.vae encode VIDEO.mp4 -o LATENTS.safetensors (--model_dir DIR | --vae_url URL)
    python -m stepvideo.vae decode LATENTS.safetensors -o VIDEO.mp4 (--model_dir DIR | --vae_url URL)
    python -m stepvideo.vae reconstruct VIDEO.mp4 -o OUT.mp4 (--model_dir DIR | --vae_url URL)

``reconstruct`` encodes (posterior mean), decodes and prints the PSNR / SSIM of the round trip
(measured on the frames before mp4 compression, with the code of ``benchmark/compare.py``).
Frame counts the VAE does not take (17*k, optionally plus 8*j+1) are refused unless
``--frames pad`` or ``--frames trim``; sides that are not multiples of 16 are refused unless
``--crop``. Inputs and the output folder are checked before any weight is read.
Exit codes: 0 ok, 2 bad input or unreachable service. See docs/quality.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from ..accelerator import accelerator
from ..io.video import read_mp4
from ..quality.metrics import compare_videos
from ..tool import add_debug_flag, run_tool, tool_parser
from ..vae.codec import (VideoWriteOptions, check_size, encode_video, fit_frames, frames_to_video, latents_to_mp4,
                         open_vae)
from ..vae.latents_file import load_latents, save_latents

logger = logging.getLogger("stepvideo.vae")


def _add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output file")
    p.add_argument("--model_dir", default=None, help="model dir, its vae/ folder, or a Hub repo id (run locally)")
    p.add_argument("--vae_url", default=None, help="caption/VAE service (http://host:port) instead of a local VAE")
    p.add_argument("--service_token", default=None, help="service token (default: env STEPVIDEO_SERVICE_TOKEN)")
    p.add_argument("--device", default=None, help="local VAE device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="local VAE dtype")
    add_debug_flag(p)


def _add_video_in_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", default="refuse", choices=["refuse", "pad", "trim"],
                   help="frame counts that are not 17*k (+8*j+1): refuse (default), pad with the last frame, trim")
    p.add_argument("--crop", action="store_true", help="centre-crop sides down to multiples of 16 instead of refusing")


def _add_video_out_args(p: argparse.ArgumentParser, with_tiling: bool = True) -> None:
    p.add_argument("--fps", type=int, default=None, help="output fps (default: the source's, else 25)")
    p.add_argument("--crop_540p", action="store_true", help="apply the generation's 540p centre crop")
    p.add_argument("--denoise_filter", action="store_true", help="apply the generation's atadenoise filter")
    if with_tiling:
        p.add_argument("--tiling", action="store_true", help="local VAE: decode in spatial tiles (less memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(__doc__, prog="python -m stepvideo.vae")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="video -> latents (.safetensors)")
    enc.add_argument("video")
    _add_vae_args(enc)
    _add_video_in_args(enc)
    enc.add_argument("--mode", default="mean", choices=["mean", "sample"], help="posterior mean or a draw")
    enc.add_argument("--seed", type=int, default=None, help="--mode sample: seed (chunk k uses seed + k)")
    dec = sub.add_parser("decode", help="latents (.safetensors, key 'latents' [B, F, C, h, w]) -> mp4")
    dec.add_argument("latents")
    _add_vae_args(dec)
    _add_video_out_args(dec)
    rec = sub.add_parser("reconstruct", help="video -> latents -> video; prints PSNR / SSIM of the round trip")
    rec.add_argument("video")
    _add_vae_args(rec)
    _add_video_in_args(rec)
    _add_video_out_args(rec)
    return parser


def _check_paths(source: str, output: str, suffixes: Sequence[str]) -> Path:
    if not Path(source).is_file():
        raise FileNotFoundError(f"input not found: {source}")
    out = Path(output)
    if not any(out.name.endswith(s) for s in suffixes):
        raise ValueError(f"-o {output}: the output must end with {' or '.join(suffixes)}")
    folder = out.parent if str(out.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"-o {output}: cannot write to {folder}")
    return out


def _read_video(args):
    frames, meta = read_mp4(args.video)
    frames = check_size(frames, crop=args.crop)
    fitted, original = fit_frames(frames, args.frames)
    if len(fitted) != original:
        logger.info("%s: %d frames -> %d (--frames %s)", args.video, original, len(fitted), args.frames)
    return frames, fitted, original, meta


def _vae(args):
    device = args.device
    if device is None and args.model_dir is not None:
        device = "cuda" if accelerator().is_available() else "cpu"
    return open_vae(args.model_dir, args.vae_url, device=device or "cpu", dtype=args.dtype,
                    token=args.service_token, tiling=getattr(args, "tiling", False))


def _write_options(args, fps: Optional[float]):
    return VideoWriteOptions(fps=int(args.fps or round(fps or 25)), crop_540p=args.crop_540p,
                             denoise_filter=args.denoise_filter)


def run(args) -> int:
    if args.command == "encode":
        out = _check_paths(args.video, args.output, [".safetensors"])
        _, fitted, original, meta = _read_video(args)
        vae = _vae(args)
        latents = encode_video(vae, frames_to_video(fitted), mode=args.mode, seed=args.seed, progress=True)
        save_latents(out, latents, {"source": str(args.video), "frames": original, "encoded_frames": len(fitted),
                                    "fps": meta.get("fps"), "mode": args.mode, "seed": args.seed})
        print(f"latents {list(latents.shape)} -> {out}")
        return 0
    if args.command == "decode":
        out = _check_paths(args.latents, args.output, [".mp4"])
        latents, meta = load_latents(args.latents)
        vae = _vae(args)
        frames_kept = meta.get("frames") if isinstance(meta.get("frames"), int) else None
        path, frames = latents_to_mp4(vae, latents, out, _write_options(args, meta.get("fps")),
                                      num_frames=frames_kept, progress=True)
        print(f"video {list(frames.shape)} -> {path}")
        return 0
    # reconstruct
    out = _check_paths(args.video, args.output, [".mp4"])
    frames, fitted, original, meta = _read_video(args)
    vae = _vae(args)
    latents = encode_video(vae, frames_to_video(fitted), mode="mean", progress=True)
    path, decoded = latents_to_mp4(vae, latents, out, _write_options(args, meta.get("fps")), num_frames=original,
                                   progress=True)
    reference = frames[:len(decoded)]
    if decoded.shape != reference.shape:
        print(f"video {list(decoded.shape)} -> {path} (shape differs from the input {list(reference.shape)}: "
              "no PSNR; drop --crop_540p)")
        return 0
    result = compare_videos(reference, decoded)
    psnr = "inf" if math.isinf(result.psnr) else f"{result.psnr:.2f}"
    print(f"reconstruction: psnr {psnr} dB, ssim {result.ssim:.4f}, max |diff| {result.max_abs_diff}, "
          f"worst frame {result.worst_frame}, latents {list(latents.shape)}")
    print(f"video {list(decoded.shape)} -> {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser().parse_args(argv), run,
                    (ValueError, FileNotFoundError, PermissionError, RuntimeError, OSError))

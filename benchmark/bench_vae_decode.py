"""Time and peak memory of a Video-VAE v2 decode: chunked into a preallocated output (ours)
vs. the reference's decode-every-chunk-then-concatenate.

    python benchmark/bench_vae_decode.py --latent 3 4 4 --tiny            # tiny widths, seconds on CPU
    python benchmark/bench_vae_decode.py --latent 21 34 62 --device cuda  # real widths, 204 x 544 x 992

Weights are random (``init_random_weights``) at the real widths unless ``--tiny``, or loaded
from ``--model`` (model dir / vae dir / vae_v2.safetensors). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the growth of the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from stepvideo.loading import parse_dtype
from stepvideo.models.vae import AutoencoderKL
from stepvideo.testing.init import init_random_weights
from stepvideo.testing.tiny import TINY
from stepvideo.testing.tiny_vae import tiny_vae_config


def build_vae(args) -> AutoencoderKL:
    dtype = parse_dtype(args.dtype)
    if args.model:
        return AutoencoderKL.from_pretrained(args.model, dtype=dtype, device=args.device)
    config = tiny_vae_config(TINY) if args.tiny else {}
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae = vae.to_empty(device=args.device)
    init_random_weights(vae, seed=args.seed)
    return vae.to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def decode_concat(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Reference-style decode: keep every decoded chunk, ``torch.cat`` them, then mix."""
    chunks = [vae.decode_chunk(z[:, l0:l1]) for l0, l1, _, _ in vae.chunk_bounds(z.shape[1])]
    return vae.mix(torch.cat(chunks, dim=1))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn, device: torch.device):
    """Run ``fn()``; return (seconds, peak bytes above the memory in use before the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - before, out
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)          # hand freed heap back so RSS is a fair baseline
        Path("/proc/self/clear_refs").write_text("5")    # reset the peak-RSS watermark
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return seconds, max(_rss_kib("VmHWM") - before, 0) * 1024, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", nargs=3, type=int, default=[3, 4, 4], metavar=("F", "h", "w"),
                        help="latent frames, height, width (pixels: 17F/3 frames, 16h x 16w)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny test widths instead of the real ones")
    parser.add_argument("--model", default=None, help="load weights from a model dir / vae dir / file")
    parser.add_argument("--mode", choices=("chunked", "concat", "both"), default="both")
    parser.add_argument("--tile", nargs=2, type=int, default=None, metavar=("SIZE", "OVERLAP"),
                        help="also time spatially tiled decode (latent pixels)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every mode first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    vae = build_vae(args)
    f, h, w = args.latent
    z = torch.randn(args.batch, f, vae.z_channels, h, w, generator=torch.Generator().manual_seed(args.seed))
    z = z.to(device=device, dtype=vae.dtype)
    params = sum(p.numel() for p in vae.parameters())
    print(f"VAE {'tiny' if args.tiny else 'real'} widths ({params / 1e6:.1f} M params), {vae.dtype}, {device}, "
          f"latent {tuple(z.shape)} -> video ({args.batch}, {vae.num_frames(f)}, 3, {16 * h}, {16 * w})")

    runs = {"chunked": vae.decode, "concat": lambda x: decode_concat(vae, x)}
    names = list(runs) if args.mode == "both" else [args.mode]
    if args.tile:
        runs["tiled"] = lambda x: vae.enable_tiling(*args.tile).decode(x)
        names.append("tiled")
    for name in names * args.warmup:
        runs[name](z)
        vae.disable_tiling()
    results = {}
    for name in names:
        best_t, peak = float("inf"), 0
        for _ in range(args.repeat):
            seconds, mem, out = measure(lambda: runs[name](z), device)
            vae.disable_tiling()
            best_t, peak = min(best_t, seconds), max(peak, mem)
            results[name] = out.float().cpu()
            del out
        print(f"{name:8s} best {best_t:8.3f} s   peak +{peak / 2**20:9.1f} MiB")
    if "chunked" in results and "concat" in results:
        print(f"max |chunked - concat| = {(results['chunked'] - results['concat']).abs().max().item():.3g}")
    if "tiled" in results and "chunked" in results:
        err = results["tiled"] - results["chunked"]
        print(f"tiled vs untiled: max abs {err.abs().max().item():.3g}, "
              f"relative RMS {(err.pow(2).mean().sqrt() / results['chunked'].std()).item():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

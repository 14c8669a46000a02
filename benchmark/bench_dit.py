"""Benchmark one Step-Video DiT denoising step (CFG batch 2) at the real width.

GPU (H100 / H200), real config, 204x544x992 (75,888 tokens):

    python benchmark/bench_dit.py --layers 48 --attention_backend auto
    python benchmark/bench_dit.py --layers 8 --compile --attention_backend sdpa-cudnn
    python benchmark/bench_dit.py --layers 8 --fp8

CPU smoke run (seconds):

    python benchmark/bench_dit.py --device cpu --dtype fp32 --layers 1 --heads 4 \
        --frames 17 --height 64 --width 64 --warmup 1 --steps 1

Weights are random (built on the meta device, ``to_empty``, then a cheap normal fill): the
timings do not depend on the values. Prints seconds per step, the analytic FLOP count and the
achieved TFLOP/s, the ratio to a dense ``--matmul_size``^3 matmul measured in the same run, peak
GPU memory and the memory model of ``stepvideo.perf.memory_model``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stepvideo.models.attention import BACKENDS  # noqa: E402
from stepvideo.models.dit import StepVideoModel  # noqa: E402
from stepvideo.perf import flops, memory_model  # noqa: E402
from stepvideo.perf.speed import apply_speed_options  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--heads", type=int, default=48, help="attention heads (x128 = width); shrink for CPU")
    p.add_argument("--frames", type=int, default=204)
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=992)
    p.add_argument("--text_tokens", type=int, default=397, help="77 CLIP + LLM tokens (valid, after masking)")
    p.add_argument("--attention_backend", default="auto", choices=list(BACKENDS))
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every block (stepvideo.perf.compile; Inductor cache: $TORCHINDUCTOR_CACHE_DIR, "
                        "default ~/.cache/stepvideo/inductor)")
    p.add_argument("--fp8", action="store_true", help="fp8 e4m3 block linears (stepvideo.fp8_linear)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--matmul_size", type=int, default=8192, help="reference square matmul (0 = skip)")
    p.add_argument("--sp", type=int, default=1, help="memory model only: show this SP degree too")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def build_model(args, device, dtype):
    with torch.device("meta"):
        model = StepVideoModel(num_attention_heads=args.heads, num_layers=args.layers,
                               attention_backend=args.attention_backend)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith("scale_shift_table") or name.endswith("bias"):
            p.normal_(0, 0.05, generator=gen)
        else:
            p.fill_(1.0)
    model.eval().requires_grad_(False)
    return apply_speed_options(model, device, fp8=args.fp8, compile=args.compile)


def make_inputs(args, device, dtype):
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    f = args.frames // 17 * 3
    h, w = args.height // 16, args.width // 16
    llm_tokens = max(args.text_tokens - 77, 1)
    x = torch.randn(2, f, 64, h, w, generator=g, device=device, dtype=dtype)
    llm = torch.randn(2, llm_tokens, 6144, generator=g, device=device, dtype=dtype)
    clip = torch.randn(2, 77, 1024, generator=g, device=device, dtype=dtype)
    mask = torch.ones(2, 77 + llm_tokens, device=device, dtype=dtype)
    t = torch.full((2,), 0.5, device=device, dtype=dtype)
    return dict(hidden_states=x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t,
                encoder_attention_mask=mask, return_dict=False), (f, h, w)


def matmul_tflops(n, device, dtype, repeats=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")   # backend, compile time
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = build_model(args, device, dtype)
    inputs, (f, h, w) = make_inputs(args, device, dtype)
    tokens = f * h * w
    width = args.heads * 128
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={args.dtype} layers={args.layers} heads={args.heads} width={width} "
          f"grid={f}x{h}x{w} tokens={tokens} batch=2 attention={model.attention_backend} "
          f"compile={args.compile} fp8={args.fp8}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for _ in range(args.warmup):
            model(**inputs)
        sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model(**inputs)
            sync(device)
            times.append(time.perf_counter() - t0)
    step = min(times)

    shape = flops.DiTShape(tokens=tokens, text_tokens=args.text_tokens, width=width, layers=args.layers,
                           batch=2)
    total = flops.step_flops(shape)["total"]
    achieved = total / step / 1e12
    print(flops.format_flops(shape))
    print(f"seconds/step: min {step:.4f}  mean {sum(times) / len(times):.4f}  (steps={args.steps})")
    print(f"achieved: {achieved:.3f} TFLOP/s")
    if args.matmul_size:
        ref = matmul_tflops(args.matmul_size, device, dtype)
        print(f"{args.dtype} {args.matmul_size}^3 matmul: {ref:.3f} TFLOP/s; DiT step / matmul = {achieved / ref:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB reserved")
    dims = memory_model.ModelDims(width=width, heads=args.heads, layers=args.layers)
    bpe = torch.finfo(dtype).bits // 8
    sps = sorted({s for s in (1, 2, 4, 8, args.sp) if args.heads % s == 0})
    tps = [t for t in (1, 2) if args.heads % t == 0]
    rows = [r for r in memory_model.table(tokens, sps=sps, tps=tps, dims=dims, bytes_per_el=bpe, fp8=args.fp8,
                                          text_tokens=args.text_tokens) if args.heads % (r["sp"] * r["tp"]) == 0]
    print(f"memory model (this config, {args.dtype}{', fp8 block linears' if args.fp8 else ''}):")
    print(memory_model.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

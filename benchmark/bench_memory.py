"""Peak device memory of full-size generation, measured on CPU without allocating it.

    python benchmark/bench_memory.py --profile 80g                       # 544x992x204 T2V
    python benchmark/bench_memory.py --profile 24g --mode ti2v --num_frames 102
    python benchmark/bench_memory.py --profile 16g                       # 16 GB card
    python benchmark/bench_memory.py --profile 16g --stream_from_disk    # host: blocks read from disk
    python benchmark/bench_memory.py --profile 48g --json out.json
    python benchmark/bench_memory.py --layouts                          # SP x TP x CFG table (minutes)
    python benchmark/bench_memory.py --service                          # caption/VAE service peak
    python benchmark/bench_memory.py --spikes                           # FP8 layer and Ulysses peaks

Each stage (encode, step, decode, write) is traced with the real modules at the real widths
under FakeTensorMode + MemTracker (stepvideo/perf/memory_accounting.py) and placed by the
memory profile (stepvideo/perf/memory_profiles.py); the CUDA context, workspaces and allocator
reserve are added as stated constants. One line per stage; the last line is
``peak_gib=<x> budget_gib=<y> fits=<yes|no> host_peak_gib=<z>`` (fits: at least 3% under the
budget). The ``host=<stage>`` lines give the host RAM per stage (pinned and pageable weights, the
loader's tensor in flight, decoded frames, the mp4 writer; stepvideo/perf/host_memory.py);
``--stream_from_disk`` prints them for disk streaming, with the bytes read per step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo.config import PRESETS  # noqa: E402
from stepvideo.perf.memory_profiles import PROFILES  # noqa: E402
from stepvideo.perf import host_memory  # noqa: E402
from stepvideo.perf import memory_accounting as acc  # noqa: E402
from stepvideo.perf import memory_report as report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="80g", choices=[n for n in PROFILES if n != "none"] + ["none"],
                   help="memory profile (budget and placement)")
    p.add_argument("--mode", default="t2v", choices=["t2v", "ti2v"], help="T2V or TI2V checkpoint")
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=992)
    p.add_argument("--num_frames", type=int, default=None, help="default 204 (t2v) / 102 (ti2v)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    p.add_argument("--layouts", action="store_true", help="also print the per-layout step table")
    p.add_argument("--service", action="store_true", help="also print the caption/VAE service's peak")
    p.add_argument("--stream_from_disk", action="store_true",
                   help="host side: DiT blocks read from the safetensors files as needed (disk streaming)")
    p.add_argument("--spikes", action="store_true",
                   help="also print the FP8 layer peaks (SP 1) and the Ulysses attention-call peaks (SP 2/4/8)")
    p.add_argument("--model_dir", default=None,
                   help="also print the DiT tensor bytes of this checkpoint as loaded (an fp8 folder from "
                        "python -m stepvideo.quantize stays fp8 + fp32 scales, as the 48g accounting assumes)")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            p.error(f"--{name} must be a positive multiple of 16, got {value}")
    if args.num_frames is None:
        args.num_frames = PRESETS[args.mode].num_frames
    if args.num_frames < 17:
        p.error(f"--num_frames must be at least 17, got {args.num_frames}")
    return args


def service_lines(video: acc.VideoShape, encode: acc.EncodeMeasurement, decode: acc.DecodeMeasurement):
    """The service holds Step-LLM + CLIP + VAE; its peak is the larger of a caption and a decode request."""
    weights = encode.llm_weights + encode.clip_weights + decode.weights
    caption = weights + (encode.llm_peak - encode.llm_weights) + max(0, encode.clip_peak - encode.clip_weights)
    dec = weights + (decode.peak - decode.weights)
    peak = max(caption, dec)
    total = peak + acc.overhead_bytes(peak)
    return [f"service: weights {acc.gib(weights):.2f} GiB; caption request (2 x 320 tokens) "
            f"{acc.gib(caption):.2f} GiB; decode request ({video}, untiled) {acc.gib(dec):.2f} GiB; "
            f"device peak with constants {acc.gib(total):.2f} GiB"], total


def spike_lines(video: acc.VideoShape):
    """Peaks of the two fixed spikes at the full token count (GiB, inputs and weights included):
    one block linear in bf16 vs fp8 (2 x tokens, SP 1), and one Ulysses attention call on rank 0
    (the caller's q, k, v, the send and receive buffers, the attention output)."""
    import torch

    lines = []
    for name, k, n in (("FFN up", 6144, 24576), ("FFN down", 24576, 6144), ("attn1 wqkv", 6144, 18432)):
        bf16, f8 = acc.linear_peaks(video.tokens, k, n)
        lines.append(f"spike: {name} {k}->{n}: input {acc.gib(2 * video.tokens * k * 2):.2f} GiB, bf16 F.linear "
                     f"{acc.gib(bf16.peak):.2f} GiB, fp8 {acc.gib(f8.peak):.2f} GiB")
    for sp in (2, 4, 8):
        length = -(-video.tokens // sp)
        with acc.fake_mode():
            sequence = acc.accounting_sequence(sp, 0)
            sequence._lengths = [length] * sp
            q, k, v = (torch.empty(2, length, 48, 128, dtype=torch.bfloat16) for _ in range(3))
            trace, _ = acc.trace_peak(lambda: sequence.attention(q, k, v, lambda a, b, c: torch.empty_like(a)),
                                      q, k, v)
        lines.append(f"spike: Ulysses SP {sp}: q+k+v {acc.gib(3 * q.numel() * 2):.2f} GiB, "
                     f"attention call peak {acc.gib(trace.peak):.2f} GiB")
    return lines


def model_errors(row: dict, video: acc.VideoShape, ti2v: bool) -> dict:
    """Relative error of the analytic estimate (weights + activations + fused attention) against
    one layout row's traced allocated peak, bf16 and fp8."""
    from stepvideo.perf import memory_model

    sp, tp, cfg = row["sp"], row["tp"], row["cfg"]
    dims = memory_model.ModelDims(motion=ti2v)
    errors = {}
    for key, fp8 in (("bf16", False), ("fp8", True)):
        e = memory_model.estimate(video.tokens, sp=sp, tp=tp, batch=1 if cfg else 2, dims=dims, fp8=fp8)
        errors[key] = (e["weights"] + e["activations"] + e["attention_fused"]) / row[key] - 1
    return errors


def checkpoint_line(model_dir: str, profile) -> str:
    """The DiT tensors of ``model_dir`` as loaded: stored bytes per dtype from the safetensors
    headers (an fp8 folder loads as stored; a bf16 one is quantised to the same fp8 layout by a
    fp8 profile at load time)."""
    from stepvideo.loading import checkpoint as ckpt
    from stepvideo.loading import fp8_checkpoint, layout

    sizes = fp8_checkpoint.resident_bytes(model_dir)
    folder = Path(model_dir)
    folder = folder / layout.TRANSFORMER_DIR if (folder / layout.TRANSFORMER_DIR).is_dir() else folder
    fp8 = fp8_checkpoint.is_fp8_config(ckpt.read_json(folder / layout.TRANSFORMER_CONFIG))
    kind = "fp8 folder (loads as stored)" if fp8 else ("bf16 folder, quantised at load" if profile.dit_fp8
                                                        else "bf16 folder")
    parts = ", ".join(f"{k} {acc.gib(v):.2f}" for k, v in sorted(sizes.items()))
    return f"checkpoint {model_dir}: {kind}; DiT tensors {acc.gib(sum(sizes.values())):.2f} GiB ({parts} GiB)"


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    video = acc.VideoShape(args.height, args.width, args.num_frames)
    ti2v = args.mode == "ti2v"
    start = time.perf_counter()
    print(f"# {args.mode} {video} ({video.tokens} tokens/sample), profile {profile.name}: "
          f"{profile}")
    print(f"# constants: CUDA context {acc.gib(acc.CUDA_CONTEXT_BYTES):.2f} GiB, workspaces "
          f"{acc.gib(acc.CUDA_WORKSPACE_BYTES):.2f} GiB, allocator reserve {acc.ALLOCATOR_RESERVE:.0%}")
    encode = acc.measure_encode()
    decode = acc.measure_decode(video, tile=profile.vae_tile, chunks=1)
    result = report.profile_report(profile, video, ti2v=ti2v, encode=encode, decode=decode)
    data = {"profile": profile.name, "mode": args.mode, "video": str(video), "tokens": video.tokens,
            "stages": {s.stage: {"allocated_gib": acc.gib(s.allocated), "device_gib": acc.gib(s.total),
                                 "parts": s.parts} for s in result.stages},
            "moved_per_step_gib": acc.gib(result.moved_per_step),
            "moved_per_video_gib": acc.gib(result.moved_per_video)}
    if args.layouts:
        rows = report.layout_rows(video, ti2v=ti2v)
        print(f"{'layout':<14}{'bf16':>8}{'fp8':>8}{'bf16+offl':>11}{'fp8+offl':>10}"
              f"{'model err bf16/fp8':>20}   (GiB per GPU, with constants; model: memory_model.estimate "
              f"vs the traced allocated peak)")
        for r in rows:
            t = r["total"]
            errors = model_errors(r, video, ti2v)
            print(f"{r['layout']:<14}{acc.gib(t['bf16']):8.1f}{acc.gib(t['fp8']):8.1f}"
                  f"{acc.gib(t['bf16_offload']):11.1f}{acc.gib(t['fp8_offload']):10.1f}"
                  f"{100 * errors['bf16']:+10.1f}%/{100 * errors['fp8']:+.1f}%")
            r["model_error"] = errors
        data["layouts"] = [{"layout": r["layout"], **{k: acc.gib(v) for k, v in r["total"].items()},
                            "model_error": r["model_error"]} for r in rows]
    if args.service:
        full_decode = acc.measure_decode(video, chunks=1) if profile.vae_tile else decode
        lines, total = service_lines(video, encode, full_decode)
        print("\n".join(lines))
        data["service_gib"] = acc.gib(total)
    if args.spikes:
        lines = spike_lines(video)
        print("\n".join(lines))
        data["spikes"] = lines
    if args.model_dir:
        print(checkpoint_line(args.model_dir, profile))
    for line in report.format_profile(result):
        print(line)
    sizes = report.host_sizes(profile, video, encode, acc.dit_weights(ti2v=ti2v))
    plan = host_memory.host_plan(profile, sizes, disk=args.stream_from_disk)
    for line in host_memory.format_host(plan):
        print(line)
    data["host"] = {s.stage: {"pinned_gib": acc.gib(s.pinned), "pageable_gib": acc.gib(s.pageable),
                              "parts": s.parts} for s in plan.stages}
    fits = "yes" if result.fits else "no"
    data.update(peak_gib=acc.gib(result.peak), budget_gib=profile.budget_gib, fits=fits,
                host_peak_gib=acc.gib(plan.peak), seconds=time.perf_counter() - start)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    print(f"peak_gib={acc.gib(result.peak):.2f} budget_gib={profile.budget_gib:g} fits={fits} "
          f"host_peak_gib={acc.gib(plan.peak):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

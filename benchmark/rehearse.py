r"""Rehearse the first GPU run on this CPU-only host: fake CUDA devices, fake process groups.

    python benchmark/rehearse.py --profile 80g                          # one GPU, 544x992x204 T2V
    python benchmark/rehearse.py --profile 24g --mode ti2v              # TI2V, 102 frames
    python benchmark/rehearse.py --profile none --nproc 4 --rank 3 --ulysses_degree 4
    python benchmark/rehearse.py --profile 48g --tiny --height 64 --width 64 --num_frames 17
    python benchmark/rehearse.py --service [--mode ti2v]                # the caption/VAE service's own GPU

The real entry path of ``run_parallel.py`` (``stepvideo.cli.generate.generate``) runs on fake
``cuda:<rank>`` tensors (FakeTensorMode) with the released architecture's weights as shape-only
tensors, 2 denoising steps by default; other ranks are simulated by torch's ``fake`` process group.
It prints the placement order, the running peak after each stage, every mixed-device op and host
sync with its source line, and as its last line

    rehearsal: ok|FAIL peak_gib=<x> budget_gib=<y> mixed_device_ops=<n> host_syncs_per_step=<n> h2d_gib_per_step=<x>

``ok``: no mixed-device op, every step ran, and the peak (allocated, plus the stated CUDA
constants of stepvideo/perf/memory_accounting.py) is under the budget. Exit code 0 for ok, 1 for FAIL.
What a rehearsal cannot see (kernels, NCCL, timings, flash-attn's signature): docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo.perf.memory_profiles import PROFILES  # noqa: E402
from stepvideo.perf import memory_accounting as acc  # noqa: E402
from stepvideo.perf.memory_accounting import GIB  # noqa: E402
from stepvideo.rehearsal.audit import print_events  # noqa: E402
from stepvideo.rehearsal.run import Rehearsal, rehearse  # noqa: E402
from stepvideo.rehearsal.service import ServiceRehearsal, rehearse_service  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="80g", choices=[*PROFILES, "auto"],
                   help="--memory_profile of the run (its budget is the card's; 'none' and 'auto': an 80 GB card, "
                        "or --card_gib)")
    p.add_argument("--mode", default="t2v", choices=["t2v", "ti2v"])
    p.add_argument("--nproc", type=int, default=1, help="ranks in the layout")
    p.add_argument("--rank", type=int, default=0, help="the rank this process rehearses")
    p.add_argument("--ulysses_degree", type=int, default=None, help="default: nproc / (tp x cfg)")
    p.add_argument("--tensor_parallel_degree", type=int, default=1)
    p.add_argument("--cfg_parallel", action="store_true")
    p.add_argument("--sp_backend", default="native", choices=["native", "xfuser"])
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=992)
    p.add_argument("--num_frames", type=int, default=None, help="default 204 (t2v) / 102 (ti2v)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps")
    p.add_argument("--card_gib", type=float, default=None, help="device memory (default: the profile's budget)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of the released sizes")
    p.add_argument("--host_ram_gib", type=float, default=1024.0,
                   help="host RAM the run's pre-flight plans with (the fake weights take none; default: a GPU "
                        "node's 1024 GiB; a small value rehearses the host-memory choice)")
    p.add_argument("--service", action="store_true",
                   help="rehearse the caption/VAE service on its own device instead: the prompt embedding, "
                        "(TI2V) the image encode and the full-size decode of one generation")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--no_service", dest="no_service", action="store_true", default=None,
                       help="rank 0 encodes and decodes itself (default for one-GPU runs with a memory profile)")
    where.add_argument("--service_elsewhere", dest="no_service", action="store_false",
                       help="rank 0 talks to a caption/VAE service on another GPU (default for multi-rank runs "
                            "and --profile none): the real service app on 127.0.0.1 answering the shapes "
                            "of the service's own rehearsal")
    p.add_argument("--work_dir", default=None, help="folder for the shape-only model and the mp4 (default: a temp dir)")
    p.add_argument("--on_gpu", action="store_true",
                   help="run the same command and audit on this host's CUDA GPU (zero weights; scripts/gpu_check.sh)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.nproc:
        p.error(f"--rank must be in [0, --nproc={args.nproc}), got {args.rank}")
    if args.ulysses_degree is None:
        rest = args.tensor_parallel_degree * (2 if args.cfg_parallel else 1)
        if args.nproc % rest:
            p.error(f"--nproc {args.nproc} is not a multiple of tp x cfg = {rest}")
        args.ulysses_degree = args.nproc // rest
    return args


def main_service(args: argparse.Namespace) -> int:
    """``--service``: the caption/VAE service's requests on its own fake device."""
    config = ServiceRehearsal(mode=args.mode, height=args.height, width=args.width, num_frames=args.num_frames,
                              full=not args.tiny, card_gib=args.card_gib, work_dir=args.work_dir, on_gpu=args.on_gpu)
    print(f"# service rehearsal: {args.mode} {config.height}x{config.width}x{config.frames}, "
          f"{'tiny' if args.tiny else 'released'} model, encoders and VAE on fake cuda:0 of {config.budget_gib:g} GiB",
          flush=True)
    result = rehearse_service(config)
    print(f"loaded: {result.loaded / GIB:.2f} GiB on the device")
    for name, peak in result.request_peaks.items():
        print(f"peak during {name}: {peak / GIB:.2f} GiB allocated")
    for line in result.comparison():
        print(line)
    print(f"budget per request: {result.budget / GIB:.2f} GiB ({result.budget_source})")
    for line in result.refusals:
        print(f"refused: {line}")
    print_events(result.audit)
    print(f"{result.seconds:.0f} s")
    if result.error:
        print(f"error: {result.error}")
    print(result.last_line())
    return 0 if result.ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.service:
        return main_service(args)
    config = Rehearsal(profile=args.profile, mode=args.mode, nproc=args.nproc, rank=args.rank,
                       ulysses_degree=args.ulysses_degree, tensor_parallel_degree=args.tensor_parallel_degree,
                       cfg_parallel=args.cfg_parallel, sp_backend=args.sp_backend, height=args.height,
                       width=args.width, num_frames=args.num_frames, steps=args.steps, full=not args.tiny,
                       card_gib=args.card_gib, work_dir=args.work_dir, on_gpu=args.on_gpu,
                       no_service=args.no_service, host_ram_gib=args.host_ram_gib)
    print(f"# rehearsal: {args.mode} {config.height}x{config.width}x{config.frames}, {config.steps} steps, "
          f"{'tiny' if args.tiny else 'released'} model, profile {args.profile}, rank {args.rank} of {args.nproc} "
          f"(SP {config.ulysses_degree} x TP {config.tensor_parallel_degree}"
          f"{' x CFG 2' if config.cfg_parallel else ''}), fake cuda:{args.rank} of {config.budget_gib:g} GiB, "
          f"{'encoders and VAE on this rank (--no_service)' if config.local else 'caption/VAE service elsewhere'}, "
          f"host RAM {args.host_ram_gib:g} GiB",
          flush=True)
    try:
        result = rehearse(config)
    except (ValueError, FileNotFoundError) as err:           # nothing ran: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in result.placement:
        print(f"placement: {line}")
    for stage, peak in result.stage_peaks.items():
        print(f"peak during {stage}: {peak / GIB:.2f} GiB allocated, "
              f"{(peak + acc.overhead_bytes(peak, config.nproc)) / GIB:.2f} GiB with the constants")
    for line in result.audit.host_reads[:5]:
        print(f"host read (no device sync): {line}")
    print_events(result.audit)
    print(f"transfers: h2d {result.audit.bytes_per_step(result.audit.h2d) / GIB:.2f} GiB/step, "
          f"d2h {result.audit.bytes_per_step(result.audit.d2h) / GIB:.4f} GiB/step; "
          f"output {result.output or '-'}; {result.seconds:.0f} s")
    if result.error:
        print(f"error: {result.error}")
    if args.json:
        a = result.audit
        Path(args.json).write_text(json.dumps({
            "config": vars(args), "ok": result.ok, "peak_gib": result.peak / GIB,
            "allocated_peak_gib": result.allocated_peak / GIB, "budget_gib": config.budget_gib,
            "stage_peaks_gib": {k: v / GIB for k, v in result.stage_peaks.items()},
            "mixed_device_ops": [f"{t} x{n}" for t, n in a.grouped("mixed")],
            "host_syncs": [f"{t} x{n}" for t, n in a.grouped("sync")],
            "host_syncs_per_step": a.most_syncs_in_a_step(),
            "h2d_gib_per_step": a.bytes_per_step(a.h2d) / GIB, "placement": result.placement,
            "stages": a.stage_order, "error": result.error, "seconds": result.seconds}, indent=2))
    print(result.last_line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

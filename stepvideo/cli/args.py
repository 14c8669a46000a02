"""Command-line argument groups shared by the generation and evaluation entry points.

Used by ``stepvideo.cli.generate`` (``run_parallel.py``) and ``stepvideo.cli.evaluate``
(``benchmark/evaluation.py``); re-exported by ``stepvideo.cli``.

Arguments are turned into plain config objects here (``SamplingConfig``, ``OutputConfig``,
``ParallelConfig``); library code never sees an argparse ``Namespace``.

Sampling flags default to ``None`` so that a preset fills them: the CLI applies ``--preset``
(``t2v`` by default, ``ti2v`` when ``--first_image_path`` is given) and explicit flags win.
"""
from __future__ import annotations

import argparse
import logging
from typing import NamedTuple, Optional

from ..config import PRESETS, OutputConfig, SamplingConfig
from ..models.attention import BACKENDS as ATTENTION_BACKENDS
from ..parallel.state import ParallelConfig, ParallelState
from ..perf.memory_profiles import PROFILE_NAMES
from ..runtime.generator import RuntimeConfig
from ..sampling import sampling_from_options, sampling_options, token_count  # noqa: F401  (re-exported by stepvideo.cli)
from ..caption_service.client import READY_TIMEOUT_S


_RUNTIME, _OUTPUT = RuntimeConfig(), OutputConfig()      # the argparse defaults come from these

def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_dir", default=None,
                   help="checkpoint folder or Hub repo id (e.g. stepfun-ai/stepvideo-t2v); "
                        "default ./ckpts")
    g.add_argument("--dtype", default=_RUNTIME.dtype, choices=["bf16", "fp16", "fp32"], help="DiT weight dtype")
    g.add_argument("--attention_backend", default=_RUNTIME.attention_backend, choices=list(ATTENTION_BACKENDS),
                   help="DiT self-attention kernel (auto: flash-attn 3 on Hopper, flash-attn 2 on CUDA, else SDPA)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 (e4m3, per-channel scales) weights for the DiT block linears (scaled matmul on Hopper)")
    g.add_argument("--use-cpu-offload", "--cpu_offload", dest="use_cpu_offload", action="store_true",
                   help="keep DiT block weights in CPU memory and stream each block to the GPU when it runs")
    g.add_argument("--no_service", "--local_mode", "--local_encoders", "--local", dest="local", action="store_true",
                   help="one GPU without the service: run the text encoders and the VAE in this process, each "
                        "loaded only while needed (under torchrun use --no_service or --local_mode: torchrun "
                        "rejects --local as an ambiguous abbreviation of its own options)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every DiT block (stepvideo.perf.compile.compile_blocks); the first step "
                        "is slower while it compiles")
    g.add_argument("--memory_profile", default=_RUNTIME.memory_profile, choices=list(PROFILE_NAMES),
                   help="one-GPU placement by card size (docs/performance.md): 141g everything resident; 80g "
                        "encoders before the DiT, DiT off the device while the VAE decodes; 48g fp8 DiT + 80g; "
                        "24g DiT blocks and Step-LLM layers streamed with prefetch, tiled VAE decode; 16g the 24g "
                        "placement with fp8 blocks and token-chunked blocks; none: keep everything as "
                        "loaded; auto (default): by the device's memory for one-GPU --no_service runs; with several "
                        "ranks and --no_service rank 0 parks its DiT on the host while it encodes and decodes "
                        "(cards under 141 GB); else none; "
                        "the host's RAM is checked before any weight is read")
    g.add_argument("--stream_from_disk", action="store_true",
                   help="read the streamed DiT blocks from the checkpoint files as they are needed (memory-mapped, "
                        "prefetched) instead of holding them in RAM; --memory_profile auto picks it when RAM is short")
    g.add_argument("--vae_url", default=_RUNTIME.vae_url,
                   help="service address: http://host:port or a bare host (port 8080)")
    g.add_argument("--caption_url", default=_RUNTIME.caption_url,
                   help="service address: http://host:port or a bare host (port 8080)")
    g.add_argument("--service_token", default=None,
                   help="shared token of the service (default: env STEPVIDEO_SERVICE_TOKEN)")
    # reference flags kept for compatibility; they have no effect (documented)
    g.add_argument("--flow_reverse", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--flow_solver", default="euler", help=argparse.SUPPRESS)
    g.add_argument("--model_resolution", default="540p", help=argparse.SUPPRESS)
    g.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--num_videos", type=int, default=1, help=argparse.SUPPRESS)


def add_sampling_args(parser: argparse.ArgumentParser, with_prompt: bool = True) -> None:
    g = parser.add_argument_group("sampling (unset flags come from --preset)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="t2v (default), t2v-turbo, or ti2v (default when an image is given)")
    if with_prompt:
        g.add_argument("--prompt", default=None, help="the text prompt (Chinese or English)")
        g.add_argument("--first_image_path", default=None, help="TI2V: the first frame image")
    g.add_argument("--infer_steps", type=int, default=None, help="denoising steps")
    g.add_argument("--cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale (> 1; <= 1 runs the conditional branch only, half the work)")
    g.add_argument("--time_shift", type=float, default=None, help="schedule time shift")
    g.add_argument("--num_frames", type=int, default=None, help="frames (rounded down to a multiple of 17)")
    g.add_argument("--height", type=int, default=None, help="height in pixels (multiple of 16)")
    g.add_argument("--width", type=int, default=None, help="width in pixels (multiple of 16)")
    g.add_argument("--motion_score", type=float, default=None, help="TI2V motion: 2 stable, 5 default, 10-20 more")
    g.add_argument("--pos_magic", default=None, help="text appended to the prompt")
    g.add_argument("--neg_magic", default=None, help="the negative prompt")
    g.add_argument("--seed", type=int, default=None,
                   help="seed the initial noise (default: the reference's fixed noise, same for every run)")
    g.add_argument("--cache", default=None,
                   help="diffusers step cache: fbc:THRESHOLD (First-Block-Cache, e.g. fbc:0.03) or taylorseer:N; "
                        "needs stepvideo[diffusers] (default: none)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--save_path", default=_OUTPUT.save_path, help="output folder")
    g.add_argument("--output_file_name", default=_OUTPUT.output_file_name,
                   help="file name stem (default: from the prompt)")
    g.add_argument("--output_path", default=None, help="explicit mp4 path (used as given)")
    g.add_argument("--name_suffix", default=_OUTPUT.name_suffix, help="appended to automatic file names")
    g.add_argument("--no_crop", action="store_true", help="skip the reference's 540p centre crop")
    g.add_argument("--no_denoise_filter", action="store_true", help="skip ffmpeg's atadenoise filter")
    g.add_argument("--decode_retries", type=int, default=_RUNTIME.decode_retries,
                   help="extra decode/write attempts (backoff 2 s, doubling) before the denoised latents are "
                        "saved as <name>.latents.safetensors for `python -m stepvideo.decode` (default %(default)s)")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (torchrun) and process")
    g.add_argument("--ulysses_degree", "--sp_degree", dest="ulysses_degree", type=int, default=None,
                   help="sequence-parallel (Ulysses) degree (default: world size / tp / cfg)")
    g.add_argument("--ring_degree", type=int, default=1, help="must be 1 (kept for compatibility)")
    g.add_argument("--tensor_parallel_degree", "--tp_degree", dest="tensor_parallel_degree", type=int, default=1,
                   help="tensor-parallel degree")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="run the conditional and unconditional branches on two halves of the ranks")
    g.add_argument("--sp_backend", "--parallel_backend", dest="sp_backend", default="native",
                   choices=["native", "xfuser"],
                   help="sequence-parallel implementation: native all-to-all on torch.distributed, or xfuser "
                        "(CUDA hosts, tensor-parallel degree 1)")
    g.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="torch.distributed backend (auto: nccl on CUDA, else gloo)")
    g.add_argument("--dist_timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others in a collective before the run fails "
                        "(default %(default)s)")
    g.add_argument("--debug", action="store_true",
                   help="print tracebacks with errors (also STEPVIDEO_DEBUG=1)")


def sampling_config(args: argparse.Namespace, has_image: Optional[bool] = None) -> SamplingConfig:
    """Preset (explicit, or by mode) with the explicit flags applied on top."""
    if has_image is None:
        has_image = bool(getattr(args, "first_image_path", None))
    return sampling_from_options(sampling_options(args), has_image=has_image)


def output_config(args: argparse.Namespace) -> OutputConfig:
    return OutputConfig(save_path=args.save_path, output_file_name=args.output_file_name,
                        name_suffix=args.name_suffix, output_path=args.output_path,
                        crop_540p=not args.no_crop, denoise_filter=not args.no_denoise_filter)


def parallel_config(args: argparse.Namespace, world_size: Optional[int] = None):
    """``ParallelConfig`` from the flags; an unset ``--ulysses_degree`` takes the remaining ranks."""
    import os

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = 2 if args.cfg_parallel else 1
    ulysses = args.ulysses_degree
    if ulysses is None:
        ulysses = max(1, world // (cfg * args.tensor_parallel_degree))
    return ParallelConfig(ulysses_degree=ulysses, tensor_parallel_degree=args.tensor_parallel_degree,
                          cfg_parallel=args.cfg_parallel, ring_degree=args.ring_degree, sp_backend=args.sp_backend)


def runtime_config(args: argparse.Namespace):
    return RuntimeConfig(model_dir=args.model_dir or "./ckpts", dtype=args.dtype,
                         attention_backend=args.attention_backend, local=args.local, vae_url=args.vae_url,
                         caption_url=args.caption_url, service_token=args.service_token, fp8=args.fp8,
                         cpu_offload=args.use_cpu_offload, compile=args.compile,
                         decode_retries=args.decode_retries, memory_profile=args.memory_profile,
                         stream_from_disk=getattr(args, "stream_from_disk", False),
                         # the other ranks wait in a collective meanwhile: stay inside --dist_timeout
                         service_wait=min(READY_TIMEOUT_S, 0.9 * getattr(args, "dist_timeout", 600.0)))


class LaunchConfigs(NamedTuple):
    """Everything an entry point builds from its flags."""

    sampling: SamplingConfig
    output: OutputConfig
    parallel: "object"
    runtime: "object"


def launch_configs(args: argparse.Namespace, has_image: Optional[bool] = None) -> LaunchConfigs:
    """All config objects of a torchrun entry point; raises ValueError naming a bad flag."""
    return LaunchConfigs(sampling_config(args, has_image=has_image), output_config(args), parallel_config(args),
                         runtime_config(args))


def configure_logging() -> int:
    """INFO on global rank 0, ERROR elsewhere, with the rank in every line; returns the rank."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    return rank


def start_ranks(args: argparse.Namespace, has_image: Optional[bool] = None):
    """The common start of the torchrun entry points: config objects from the flags, then this
    rank's :class:`ParallelState` (process groups with the ``--dist_timeout`` timeout).

    Returns ``(LaunchConfigs, state)``; raises ValueError naming a bad flag. Every rank computes
    the same configs from the same flags, so a bad flag fails identically on every rank before
    any process group exists.
    """
    from datetime import timedelta

    configs = launch_configs(args, has_image=has_image)
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout must be > 0 seconds, got {args.dist_timeout}")
    backend = None if args.dist_backend == "auto" else args.dist_backend
    state = ParallelState.from_env(configs.parallel, backend=backend, timeout=timedelta(seconds=args.dist_timeout))
    return configs, state

"""What one job may ask of this server, learned at start-up, checked before a job is queued.

Two bounds besides ``--max_steps``/``--max_tokens`` (a job over either gets a 422 and is never
queued, instead of failing after its whole DiT run):

* the caption/VAE service's decode limits (``/ready`` -> ``limits.max_latent_frames`` and
  ``limits.max_latent_side``): a video whose latents the service refuses can never be made;
* the DiT tokens this layout's ranks can hold: :func:`stepvideo.perf.memory_model.estimate`
  (activations + attention workspace of one rank, for this model's sizes, dtype, Ulysses and
  tensor-parallel degree and CFG batch) against the memory free on rank 0 once the DiT is loaded
  (the GPU's free memory; on CPU the host's available RAM shared by the ranks of this host).
  The math attention workspace (quadratic in tokens) is assumed on CPU, the fused one on CUDA.
  ``--job_memory_check off`` drops this bound (for layouts the estimate does not describe, such
  as token-chunked blocks); the start-up log line shows the figure either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .. import geometry
from ..accelerator import accelerator
from ..config import DiTConfig
from ..perf import host_memory, memory_model

USABLE_FRACTION = 0.9        # of the free memory: allocator slack, the VAE client's buffers, the OS
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class JobLimits:
    """``None`` = not known (no service limits in a local run, no memory figure)."""

    max_latent_frames: Optional[int] = None
    max_latent_side: Optional[int] = None
    max_tokens_memory: Optional[int] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def service_decode_limits(ready_info: Mapping[str, Any]) -> dict:
    """``limits.max_latent_frames`` / ``max_latent_side`` of a service's ``/ready`` answer (absent
    from services older than these fields: then unknown)."""
    limits = ready_info.get("limits") or {}
    return {name: int(limits[name]) for name in ("max_latent_frames", "max_latent_side")
            if isinstance(limits.get(name), int) and not isinstance(limits.get(name), bool)}


def free_memory_bytes(device: torch.device) -> int:
    """Free memory for one rank's activations: the GPU's, else the host's available RAM divided
    among the ranks of this host."""
    if device.type == "cuda":     # free on the device, plus what torch's cache holds but does not use
        gpu = accelerator()
        return int(gpu.mem_get_info(device)[0] + gpu.cached_free_bytes(device))
    available = host_memory.available_host_bytes()     # the one seam pre-flight reads too
    if available is None:
        import psutil  # optional: non-Linux hosts

        available = int(psutil.virtual_memory().available)
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def tokens_that_fit(config: Mapping[str, Any], parallel: Any, dtype: str, device: torch.device,
                    memory_bytes: int) -> int:
    """The most DiT tokens whose per-rank activations and attention workspace fit ``memory_bytes``
    (found by bisection on :func:`memory_model.estimate`; 0 if not even one does)."""
    dims = memory_model.ModelDims.from_config(DiTConfig.from_dict(dict(config)))
    sp, tp = parallel.ulysses_degree, parallel.tensor_parallel_degree
    batch = 1 if parallel.cfg_degree > 1 else 2
    attention = "attention_fused" if device.type == "cuda" else "attention_math"
    budget = memory_bytes * USABLE_FRACTION

    def need(tokens: int) -> float:
        est = memory_model.estimate(tokens, sp=sp, tp=tp, batch=batch, dims=dims, bytes_per_el=_BYTES.get(dtype, 2))
        return est["activations"] + est[attention]

    low, high = 0, 1
    while need(high) <= budget and high < 1 << 40:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= budget else (low, mid)
    return low


def job_problem(height: int, width: int, num_frames: int, limits: Optional[JobLimits]) -> Optional[str]:
    """Why a (rounded) job size can never run here, or ``None``."""
    if limits is None:
        return None
    frames = geometry.latent_frames(num_frames)
    side = max(geometry.latent_size(height, width))
    if limits.max_latent_frames is not None and frames > limits.max_latent_frames:
        return (f"{num_frames} frames make {frames} latent frames; the VAE service decodes at most "
                f"{limits.max_latent_frames} ({geometry.pixel_frames(limits.max_latent_frames)} frames)")
    if limits.max_latent_side is not None and side > limits.max_latent_side:
        return (f"{height}x{width} is {side} latent pixels on its longer side; the VAE service decodes at most "
                f"{limits.max_latent_side} ({limits.max_latent_side * geometry.SPATIAL_COMPRESSION} pixels)")
    tokens = geometry.token_count(height, width, num_frames)
    if limits.max_tokens_memory is not None and tokens > limits.max_tokens_memory:
        return (f"{tokens} DiT tokens; this server's layout holds at most {limits.max_tokens_memory} tokens in "
                "the memory free after loading the model")
    return None

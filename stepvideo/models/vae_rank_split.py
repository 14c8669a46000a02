"""Rank-split VAE decode: every rank decodes a contiguous share of the 3-latent chunks, then
the decoded chunks are all-gathered and the seams blended.

Chunks are independent (each restarts the causal padding), so the result equals the
single-process :meth:`AutoencoderKL.decode` exactly; every rank returns the full video.
Works with any backend, including gloo on CPU (2-byte floats travel as raw bytes there).

Unlike the reference, ranks with fewer chunks send zeros instead of decoding duplicate
chunks, and the gather is chunk-major, so batch sizes > 1 are handled correctly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


def chunk_share(num_chunks: int, world_size: int, rank: int) -> range:
    """Chunk indices decoded by ``rank``: contiguous blocks of ``ceil(num_chunks / world_size)``."""
    per_rank = math.ceil(num_chunks / world_size)
    return range(min(rank * per_rank, num_chunks), min((rank + 1) * per_rank, num_chunks))


def _gather_dtype_view(t: torch.Tensor, group) -> torch.Tensor:
    """gloo does not gather every float type: send 2-byte floats as raw bytes (bit-exact)."""
    if dist.get_backend(group) == "gloo" and t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.uint8)
    return t


@torch.no_grad()
def decode_rank_split(vae, z: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Decode ``z [B, F, z, h, w]`` with the chunks split over the ranks of ``group``.

    Every rank must call this with the same ``z``. Returns the full video ``[B, N, 3, 16h, 16w]``
    on every rank (peak memory: this rank's share, the gathered chunks and the output).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("decode_rank_split needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group); use AutoencoderKL(world_size=1) otherwise")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if vae.world_size not in (1, world):
        raise ValueError(f"AutoencoderKL(world_size={vae.world_size}) does not match the process group size {world}")
    vae._check_latents(z)

    b, f, _, h, w = z.shape
    s = vae.spatial_compression
    bounds = vae.chunk_bounds(f)
    per_rank = math.ceil(len(bounds) / world)
    shape = (per_rank, b, vae.frame_len, vae.out_channels, h * s, w * s)

    local = torch.zeros(shape, dtype=vae.dtype, device=vae.device)            # [m, B, 17, 3, H, W]
    for slot, index in enumerate(chunk_share(len(bounds), world, rank)):
        l0, l1, t0, t1 = bounds[index]
        local[slot, :, : t1 - t0] = vae.decode_chunk(z[:, l0:l1])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather([_gather_dtype_view(g, group) for g in gathered], _gather_dtype_view(local, group), group=group)
    del local

    out = torch.empty(b, vae.num_frames(f), vae.out_channels, h * s, w * s, dtype=vae.dtype, device=vae.device)
    for index, (_, _, t0, t1) in enumerate(bounds):
        owner, slot = divmod(index, per_rank)
        out[:, t0:t1] = gathered[owner][slot, :, : t1 - t0]
    del gathered
    return vae.mix(out)

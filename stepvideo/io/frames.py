"""Decoded video -> uint8 frames with the reference post-processing arithmetic
(``../shared/spec/STEP_VIDEO_SPEC.md`` §5.7).

The reference converts the VAE output on the **bf16** tensor, one rounded op at a time::

    v = (clamp(v, -1, 1) + 1) * 127.5       # each op in bf16
    v = clamp(v, 0, 255).to(uint8)          # truncation toward zero

Because bf16 keeps 8 significant bits, values above 128 come out as integers or halves of the
bf16 grid, not as ``round(127.5 * (v + 1))``; matching the reference frame-for-frame therefore
needs exactly these steps in exactly this dtype. The caption/VAE service (``"output": "uint8"``)
and the pipeline both call :func:`to_uint8_frames`, so frames converted on the server equal
frames converted on the client.

Every step is a single elementwise op rounded to bf16, so CPU and CUDA give the same numbers.
"""
from __future__ import annotations

import numpy as np
import torch

from .video import crop_540p as crop_540p_frames

__all__ = ["to_uint8_frames", "stack_batch", "decoded_to_frames"]


@torch.no_grad()
def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Map a decoded video in ``[-1, 1]`` to uint8 pixel values, keeping its layout.

    Args:
        video: any shape, typically ``[B, T, 3, H, W]``; floating point. Non-bf16 input is
            rounded to bf16 first (the reference always converts the bf16 VAE output).

    Returns:
        uint8 tensor of the same shape and device. ``video`` is not modified.
    """
    if not video.is_floating_point():
        raise ValueError(f"video must be a floating-point tensor in [-1, 1], got dtype {video.dtype}")
    v = video.to(torch.bfloat16).clamp(-1.0, 1.0)   # new tensor: the in-place ops below never touch `video`
    v.add_(1.0).mul_(127.5)                        # bf16 rounding after each op, like the reference
    return v.clamp_(0.0, 255.0).to(torch.uint8)


def stack_batch(video_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, T, 3, H, W]`` -> ``uint8 [T, B*H, W, 3]``: the reference's layout quirk, the batch
    stacked along the HEIGHT axis (a batch becomes one tall video)."""
    if video_uint8.ndim != 5 or video_uint8.shape[2] != 3:
        raise ValueError(f"decoded video must be [B, T, 3, H, W], got {list(video_uint8.shape)}")
    return torch.cat(list(video_uint8), dim=2).permute(0, 2, 3, 1).contiguous()


def decoded_to_frames(video: torch.Tensor, crop_540p: bool = True) -> np.ndarray:
    """VAE output (float ``[B, T, 3, H, W]``, or uint8 converted by the service) -> the frames to
    write, ``uint8 [T, H', W', 3]``: :func:`to_uint8_frames`, :func:`stack_batch`, then the
    reference's 540p centre crop."""
    video = video.detach().cpu()
    pixels = video if video.dtype == torch.uint8 else to_uint8_frames(video)
    frames = stack_batch(pixels).numpy()
    return np.ascontiguousarray(crop_540p_frames(frames)) if crop_540p else frames

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

import torch

__all__ = ["to_uint8_frames"]


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

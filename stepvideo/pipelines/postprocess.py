"""Decoded video -> frames to write, with the reference's arithmetic and layout.

The pixel conversion is :func:`stepvideo.io.frames.to_uint8_frames` (bf16 arithmetic, shared
with the service's ``"uint8"`` output). Then the reference's layout quirk: the batch is stacked
along the HEIGHT axis (a batch becomes one tall video), ``[T, B*H, W, 3]``, and the 540p centre
crop is applied.
"""
from __future__ import annotations

import numpy as np
import torch

from ..io.frames import to_uint8_frames


def stack_batch(video_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, T, 3, H, W]`` -> ``uint8 [T, B*H, W, 3]``."""
    if video_uint8.ndim != 5 or video_uint8.shape[2] != 3:
        raise ValueError(f"decoded video must be [B, T, 3, H, W], got {list(video_uint8.shape)}")
    return torch.cat(list(video_uint8), dim=2).permute(0, 2, 3, 1).contiguous()


def decoded_to_frames(video: torch.Tensor, crop_540p: bool = True) -> np.ndarray:
    """VAE output (float ``[B, T, 3, H, W]``, or uint8 converted by the service) -> ``uint8 [T, H', W', 3]``."""
    from ..io.video import crop_540p as crop

    video = video.detach().cpu()
    pixels = video if video.dtype == torch.uint8 else to_uint8_frames(video)
    frames = stack_batch(pixels).numpy()
    return np.ascontiguousarray(crop(frames)) if crop_540p else frames

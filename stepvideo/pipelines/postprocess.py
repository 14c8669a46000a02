"""Decoded video -> uint8 frames, with the reference's arithmetic.

``(clamp(v, -1, 1) + 1) * 127.5`` evaluated op by op in bf16 (the service's VAE output dtype),
the batch stacked along the HEIGHT axis (a reference quirk: a batch becomes one tall video),
``clamp(0, 255)``, truncation to uint8, ``[T, B*H, W, 3]``, then the 540p centre crop.
"""
from __future__ import annotations

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3, H, W]`` (any float dtype; evaluated in bf16) -> ``uint8 [T, B*H, W, 3]``."""
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"decoded video must be [B, T, 3, H, W], got {list(video.shape)}")
    v = video.detach().to("cpu", torch.bfloat16)
    v = (v.clamp(-1, 1) + 1) * 127.5
    v = torch.cat(list(v), dim=2)                      # [T, 3, B*H, W]
    return v.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decoded_to_frames(video: torch.Tensor, crop_540p: bool = True) -> np.ndarray:
    """Service/VAE output -> frames to write. Accepts the float video ``[B, T, 3, H, W]`` or
    frames already converted by the service (``uint8 [T, H, W, 3]``)."""
    from ..io.video import crop_540p as crop

    if video.dtype == torch.uint8 and video.ndim == 4 and video.shape[-1] == 3:
        frames = video.numpy()
    else:
        frames = to_uint8_frames(video).numpy()
    return np.ascontiguousarray(crop(frames)) if crop_540p else frames

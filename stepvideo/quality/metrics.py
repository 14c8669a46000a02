"""Pixel metrics between two decoded videos, in plain torch.

Videos are ``uint8 [T, H, W, 3]`` (numpy or torch), the layout of :func:`stepvideo.io.video.read_mp4`
and of the pipeline's frames. Every function works frame chunk by frame chunk, so a 204-frame
544x992 video never needs more than a few hundred MB.

* PSNR (peak 255): per frame from the frame's MSE; the video's PSNR comes from the MSE over all
  frames. Identical inputs give ``inf``.
* SSIM: Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, valid (unpadded) windows, per RGB channel then averaged; the video's SSIM is
  the mean over frames.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

PEAK = 255.0
FRAME_CHUNK = 16


def as_frames(video) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` (numpy or torch) -> torch uint8 on CPU, checked."""
    t = torch.as_tensor(video)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"a video must be uint8 [T, H, W, 3], got {t.dtype} {list(t.shape)}")
    return t.cpu()


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK * PEAK / mse)


def _gaussian_1d(size: int, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma * sigma))
    return (g / g.sum()).float()


def ssim_frames(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> torch.Tensor:
    """SSIM of each frame pair: ``a, b [T, H, W, 3]`` (any real dtype, 0..255) -> ``[T]`` float64.

    The Gaussian blur is separable (a row pass and a column pass, float32: enough for
    statistics of 0..255 values against the constants ``C1 = 6.5``, ``C2 = 58.5``).
    """
    t = a.shape[0]
    x = a.to(torch.float32).permute(0, 3, 1, 2).reshape(t * 3, 1, a.shape[1], a.shape[2])   # [T*3, 1, H, W]
    y = b.to(torch.float32).permute(0, 3, 1, 2).reshape(t * 3, 1, b.shape[1], b.shape[2])
    size = min(window, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2                                         # odd window that fits the frame
    g = _gaussian_1d(size).to(x.device)
    rows, cols = g.view(1, 1, 1, size), g.view(1, 1, size, 1)

    def blur(v):
        return F.conv2d(F.conv2d(v, rows), cols)

    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.double().reshape(t, 3, -1).mean(dim=(1, 2))


@dataclass
class VideoComparison:
    """How far video B is from video A (the reference)."""

    frames: int
    psnr: float                       # dB over all frames; inf when identical
    ssim: float                       # mean over frames
    identical: bool
    max_abs_diff: int                 # pixel values (0..255)
    mean_abs_diff: float
    worst_frame: int                  # index of the frame with the largest MSE
    worst_frame_psnr: float
    frame_psnr: List[float] = field(default_factory=list)
    frame_ssim: List[float] = field(default_factory=list)
    frame_mean_abs_diff: List[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def compare_videos(a, b, chunk: int = FRAME_CHUNK, device=None) -> VideoComparison:
    """Compare two ``uint8 [T, H, W, 3]`` videos of the same shape (``chunk`` frames at a time on
    ``device``, default CPU: a CUDA device makes SSIM of long 540p videos fast)."""
    a, b = as_frames(a), as_frames(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {list(a.shape)} vs {list(b.shape)} (same settings needed)")
    if a.shape[0] == 0:
        raise ValueError("the videos have no frames")
    frame_mse: List[float] = []
    frame_mad: List[float] = []
    frame_ssim: List[float] = []
    max_abs = 0
    for start in range(0, a.shape[0], chunk):
        xa = a[start:start + chunk].to(device=device, dtype=torch.int16)
        xb = b[start:start + chunk].to(device=device, dtype=torch.int16)
        diff = (xa - xb).to(torch.float64)                         # [t, H, W, 3]
        frame_mse.extend((diff * diff).mean(dim=(1, 2, 3)).tolist())
        frame_mad.extend(diff.abs().mean(dim=(1, 2, 3)).tolist())
        max_abs = max(max_abs, int(diff.abs().max().item()))
        frame_ssim.extend(ssim_frames(xa, xb).tolist())
    mse = sum(frame_mse) / len(frame_mse)
    worst = max(range(len(frame_mse)), key=lambda i: frame_mse[i])
    return VideoComparison(frames=a.shape[0], psnr=psnr_from_mse(mse), ssim=sum(frame_ssim) / len(frame_ssim),
                           identical=max_abs == 0, max_abs_diff=max_abs,
                           mean_abs_diff=sum(frame_mad) / len(frame_mad), worst_frame=worst,
                           worst_frame_psnr=psnr_from_mse(frame_mse[worst]),
                           frame_psnr=[psnr_from_mse(m) for m in frame_mse], frame_ssim=frame_ssim,
                           frame_mean_abs_diff=frame_mad)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` is the reference); 0 for identical tensors."""
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: {list(a.shape)} vs {list(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    num = torch.linalg.vector_norm(a64 - b64).item()
    if num == 0:
        return 0.0
    den = torch.linalg.vector_norm(b64).item()
    return math.inf if den == 0 else num / den


def mean_finite(values: List[Optional[float]]) -> Optional[float]:
    """Mean of the finite values (None when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None

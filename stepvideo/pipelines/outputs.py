"""Pipeline output object (the reference returns ``video=None``; we return the frames)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch


@dataclass
class StepVideoPipelineOutput:
    """Result of one generation.

    Attributes:
        video: ``uint8 [T, H, W, 3]`` frames as written (after the 540p crop), or the fp32
            latents for ``output_type="latent"``; ``None`` on ranks other than 0.
        latents: final fp32 latents ``[B, F, C, h, w]``.
        path: the mp4 written (``output_type="mp4"`` on rank 0), else ``None``.
        timings: :meth:`stepvideo.timing.StageTimer.as_dict` of the run (encode_s, denoise_s, decode_s,
            write_s, steps_s, total_s, summary; stages that did not run are left out).
    """

    video: Optional[Any] = None
    latents: Optional[torch.Tensor] = None
    path: Optional[Path] = None
    timings: Dict[str, float] = field(default_factory=dict)

    def __getitem__(self, index):          # tuple-style access like the reference's output
        return (self.video,)[index]

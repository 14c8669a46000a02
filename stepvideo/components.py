"""The two component interfaces of the pipeline: the caption encoder and the VAE.

The pipeline calls only these methods, and local models and the service's clients implement
them alike, so it never asks which kind it holds:

* :class:`CaptionEncoderComponent`: ``text_encoders.caption.CaptionEncoder`` (local) and
  ``service.client.RemoteCaptionEncoder``;
* :class:`VAEComponent`: ``models.vae.AutoencoderKL`` or :class:`LocalVAE` (local) and
  ``service.client.RemoteVAE``.

Layouts (spec ``../shared/spec/STEP_VIDEO_SPEC.md`` §5.4, §5.6, §5.7 and §7.2):

* ``embedding(prompts)`` -> ``{"y": [B, L, C_llm] bf16, "y_mask": [B, 77 + L] int64,
  "clip_embedding": [B, 77, C_clip] bf16}``, CPU tensors.
* ``encode(videos [B, T, 3, H, W] in [-1, 1], generator=None, mode="sample", seed=None)`` ->
  latents ``[B, F, C, H/16, W/16]`` (VAE dtype). A ``seed`` draws the posterior sample from a CPU
  generator seeded with it, so local and remote give the same latents.
* ``decode(latents [B, F, C, h, w])`` -> video ``[B, T, 3, 16h, 16w]``: floats in ``[-1, 1]``
  (VAE dtype, unclamped) or uint8 pixels, as chosen when the component was built
  (``RemoteVAE(url, output="uint8")``, ``LocalVAE(vae, output="uint8")``). Remote clients and
  :class:`LocalVAE` return CPU tensors; a bare ``AutoencoderKL`` returns them on its device
  (the pipeline moves the video to CPU either way).
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, runtime_checkable

import torch

from .io.frames import to_uint8_frames

VAE_OUTPUTS = ("float", "uint8")


@runtime_checkable
class CaptionEncoderComponent(Protocol):
    """Prompt text -> the DiT's text conditioning (see the module docstring for the layouts)."""

    def embedding(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        ...


@runtime_checkable
class VAEComponent(Protocol):
    """Video <-> latents (see the module docstring for the layouts and the seed rule)."""

    def encode(self, videos: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "sample",
               seed: Optional[int] = None) -> torch.Tensor:
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ...


def check_vae_output(output: str) -> str:
    if output not in VAE_OUTPUTS:
        raise ValueError(f"VAE output must be one of {VAE_OUTPUTS}, got {output!r}")
    return output


class LocalVAE:
    """An in-process ``AutoencoderKL`` with the remote client's contract: results on CPU and
    the decode format fixed at construction.

    Args:
        vae: a loaded :class:`~stepvideo.models.vae.AutoencoderKL` (any device and dtype).
        output: ``"float"`` (VAE dtype) or ``"uint8"`` (``stepvideo.io.frames.to_uint8_frames``
            applied where the VAE runs: the numbers the service's ``"uint8"`` output gives).
    """

    def __init__(self, vae, output: str = "float"):
        self.vae = vae
        self.output = check_vae_output(output)

    def __repr__(self) -> str:
        return f"LocalVAE({type(self.vae).__name__}, output={self.output!r})"

    @property
    def z_channels(self) -> int:
        return self.vae.z_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, videos: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "sample",
               seed: Optional[int] = None) -> torch.Tensor:
        """``videos [B, T, 3, H, W]`` -> latents ``[B, F, C, H/16, W/16]`` on CPU (VAE dtype)."""
        return self.vae.encode(videos, generator=generator, mode=mode, seed=seed).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, F, C, h, w]`` -> video ``[B, T, 3, 16h, 16w]`` on CPU (float or uint8)."""
        video = self.vae.decode(latents)
        if self.output == "uint8":
            video = to_uint8_frames(video)
        return video.cpu()

"""The caption encoder and the VAE as components that the memory profile loads on demand.

A ``--no_service`` run holds these two in its pipeline from the start. Each call loads the model
(or reuses it when the profile keeps it), lets :class:`~stepvideo.perf.memory_profiles.Placement`
move the DiT and prepare the model, runs it, then frees it and logs the release. They have the
methods of :mod:`stepvideo.components`, so the pipeline calls them like the service's clients.

Layouts are those of :mod:`stepvideo.components`; results are CPU tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..accelerator import free_device
from ..loading import layout
from ..models.vae import AutoencoderKL
from ..text_encoders.caption import CaptionEncoder


class PlacedCaptionEncoder:
    """Step-LLM + CLIP from ``root``, loaded for each ``embedding`` call (kept when the profile's
    ``encoders_stay``); the DiT goes where stage ``encode`` wants it first."""

    def __init__(self, root: Path, placement, dit):
        self.root, self.placement, self.dit = Path(root), placement, dit
        self._kept: Optional[CaptionEncoder] = None

    def _load(self) -> CaptionEncoder:
        if self._kept is not None:
            return self._kept
        encoder = CaptionEncoder.from_pretrained(self.root, device=self.placement.encoder_load_device())
        self.placement.prepare_caption_encoder(encoder)
        if self.placement.profile.encoders_stay:
            self._kept = encoder
        return encoder

    def embedding(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        self.placement.enter("encode", self.dit)
        encoder = self._load()
        embeds = encoder.embedding(prompts)
        del encoder
        self.placement.release("encode", "text_encoders")
        return embeds


class PlacedVAE:
    """The Video-VAE of ``root``, loaded for each call and freed after it: ``encode`` (the TI2V
    first image, stage ``encode``) and ``decode`` (the final latents, stage ``decode``, after the
    profile moved the DiT away). Float output, as a local VAE gives it."""

    def __init__(self, root: Path, placement, dit):
        self.root, self.placement, self.dit = Path(root), placement, dit

    def _load(self, stage: str) -> AutoencoderKL:
        vae = AutoencoderKL.from_pretrained(self.root / layout.VAE_DIR, device=self.placement.device)
        self.placement.prepare_vae(vae, stage)
        return vae

    @torch.no_grad()
    def encode(self, videos: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "sample",
               seed: Optional[int] = None) -> torch.Tensor:
        vae = self._load("encode")
        latents = vae.encode(videos, generator=generator, mode=mode, seed=seed).cpu()
        del vae
        free_device(self.placement.device)
        self.placement.release("encode", "vae")
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.placement.enter("decode", self.dit)
        vae = self._load("decode")
        try:
            param = next(vae.parameters())
            return vae.decode(latents.to(param.device, param.dtype)).cpu()
        finally:
            del vae
            free_device(self.placement.device)
            self.placement.release("decode", "vae")

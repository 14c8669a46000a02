"""Video-VAE v2 encoder: ``[B, 3, T, H, W]`` video -> ``[B, 2z, F, H/16, W/16]`` moments.

Trunk: ``conv_in`` -> 4 levels of ResNet blocks (level 0 downsamples per frame in space,
levels 1 and 2 causally in time and space) -> mid block (ResNet, causal attention, ResNet)
-> ``SiLU(GN_f)`` -> space-time patchify (x2 in T, H, W) with a channel-averaging shortcut
-> ``conv_out`` with a second averaging shortcut. ``T = 8F - 7`` (17 frames -> 3 latents).
Key namespace ``encoder.*`` of the checkpoint.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vae_blocks import (CausalConv3d, ConvPixelUnshuffleDown3D, Downsample2D, Downsample3D, FrameGroupNorm,
                         MidBlock3D, PixelUnshuffleChannelAveraging3D, ResnetBlock3D)


class EncoderLevel(nn.Module):
    """``num_res_blocks`` ResNet blocks then an optional downsample (keys ``block.{i}``,
    ``downsample``; the ``attn`` list is empty in every released config)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, downsample: str,
                 per_frame_norm: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.block = nn.ModuleList(ResnetBlock3D(widths[i], widths[i + 1], per_frame_norm)
                                   for i in range(num_res_blocks))
        self.attn = nn.ModuleList()
        if downsample == "2d":
            self.downsample = Downsample2D(out_channels)
        elif downsample == "3d":
            self.downsample = Downsample3D(out_channels)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VideoEncoder(nn.Module):
    """Causal video encoder (version 2).

    Args:
        in_channels: pixel channels (3).
        ch, ch_mult: level widths ``ch * ch_mult[i]`` (real model 32 x (4, 8, 16, 16)).
        num_res_blocks: ResNet blocks per level (2).
        z_channels: latent channels; the output has ``2 * z_channels`` (mean | logvar).
        down_sampling_layers: levels whose downsample is 3D (time + space); the other levels
            except the last downsample per frame in space only.
        per_frame_norm: per-frame GroupNorm statistics (True for v2).

    Forward ``x [B, in_channels, T, H, W]`` with ``T = 8F - 7`` and H, W multiples of 16 ->
    ``[B, 2*z_channels, F, H/16, W/16]``.
    """

    def __init__(self, in_channels: int = 3, ch: int = 32, ch_mult: Sequence[int] = (4, 8, 16, 16),
                 num_res_blocks: int = 2, z_channels: int = 64, down_sampling_layers: Sequence[int] = (1, 2),
                 per_frame_norm: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        inputs = [ch] + widths[:-1]
        last = len(widths) - 1
        patch_channels = 4 * z_channels * 8   # channels after the 2x2x2 patchify (2048 for z = 64)
        if (widths[-1] * 8) % patch_channels:
            raise ValueError(f"encoder: last level width {widths[-1]} must be a multiple of 4 x z_channels "
                             f"= {4 * z_channels} for the v2 patchify shortcut (ch={ch}, ch_mult={tuple(ch_mult)})")

        self.conv_in = CausalConv3d(in_channels, ch, 3)
        self.down = nn.ModuleList()
        for level, (w_in, w_out) in enumerate(zip(inputs, widths)):
            kind = "none" if level == last else ("3d" if level in down_sampling_layers else "2d")
            self.down.append(EncoderLevel(w_in, w_out, num_res_blocks, kind, per_frame_norm))
        self.mid = MidBlock3D(widths[-1], per_frame_norm)
        self.norm_out = FrameGroupNorm(widths[-1], per_frame_norm)
        self.conv_patchify = ConvPixelUnshuffleDown3D(widths[-1], patch_channels, 3, factor=2)
        self.shortcut_pathify = PixelUnshuffleChannelAveraging3D(widths[-1], patch_channels, factor=2)
        self.shortcut_out = PixelUnshuffleChannelAveraging3D(patch_channels, 2 * z_channels, factor=1)
        self.conv_out = CausalConv3d(patch_channels, 2 * z_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                                   # [B, ch, T, H, W]
        for level in self.down:
            h = level(h)                                                      # -> [B, C, F', H/8, W/8]
        h = self.mid(h)
        h = F.silu(self.norm_out(h), inplace=True)                                          # no zero frames here (v2)
        h = self.conv_patchify(h, residual=self.shortcut_pathify(h))          # [B, 32z, F, H/16, W/16]
        return self.conv_out(h, residual=self.shortcut_out(h))                # [B, 2z, F, H/16, W/16]

"""Video-VAE v2 decoder: ``[B, z, F, h, w]`` latents -> ``[B, 3, 8F-7, 16h, 16w]`` video.

Head: ``conv_in`` plus a x32 channel-duplication shortcut, then a space-time unpatchify
(x2 in T, H, W, first frame dropped) with a duplicated shortcut. Trunk: mid block, then
levels 3 -> 0 of ResNet blocks; levels 3 and 2 upsample x2 in T, H, W, level 1 per frame
in space. Tail: ``conv_out(SiLU(GN_f(h)))`` causally, and the first
``temporal_downsample - 1 = 3`` frames are dropped (20 -> 17 for 3 latents).
Key namespace ``decoder.*`` (``decoder.conv_out.conv.*`` here; the file stores
``decoder.conv_out.*``, renamed by the loader).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vae_blocks import (CausalConv3d, ChannelDuplicatingPixelShuffle3D, ConvPixelShuffleUp3D, FrameGroupNorm,
                         MidBlock3D, ResnetBlock3D, Upsample2D, Upsample3D)


class DecoderLevel(nn.Module):
    """``num_res_blocks + 1`` ResNet blocks then an optional upsample (keys ``block.{i}``,
    ``upsample``; ``attn`` is empty)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: str,
                 per_frame_norm: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock3D(widths[i], widths[i + 1], per_frame_norm)
                                   for i in range(num_blocks))
        self.attn = nn.ModuleList()
        if upsample == "3d":
            self.upsample = Upsample3D(out_channels, per_frame_norm)
        elif upsample == "2d":
            self.upsample = Upsample2D(out_channels)
        else:
            self.upsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class VideoDecoder(nn.Module):
    """Causal video decoder (version 2).

    Args:
        out_channels: pixel channels (3).
        ch, ch_mult: level widths ``ch * ch_mult[i]`` (real model 128 x (1, 2, 4, 4)).
        num_res_blocks: the decoder runs ``num_res_blocks + 1`` ResNet blocks per level.
        z_channels: latent channels.
        temporal_up_layers: levels whose upsample is 3D (time + space); the others except
            level 0 upsample per frame in space only.
        temporal_downsample: total temporal factor; ``temporal_downsample - 1`` leading
            frames are dropped at the end.
        per_frame_norm: per-frame GroupNorm statistics (True for v2).

    Forward ``z [B, z_channels, F, h, w]`` -> ``[B, out_channels, 8F-7, 16h, 16w]``.
    """

    def __init__(self, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 64, temporal_up_layers: Sequence[int] = (2, 3),
                 temporal_downsample: int = 4, per_frame_norm: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        block_in = widths[-1]
        patch_channels = 4 * z_channels * 8   # 2048 for z = 64
        if (block_in * 8) % patch_channels:
            raise ValueError(f"decoder: widest level {block_in} must be a multiple of 4 x z_channels "
                             f"= {4 * z_channels} for the v2 unpatchify shortcut (ch={ch}, ch_mult={tuple(ch_mult)})")
        self.trim_frames = temporal_downsample - 1

        self.conv_in = CausalConv3d(z_channels, patch_channels, 3)
        self.shortcut_in = ChannelDuplicatingPixelShuffle3D(z_channels, patch_channels, factor=1)
        self.conv_unpatchify = ConvPixelShuffleUp3D(patch_channels, block_in, 3, factor=2)
        self.shortcut_unpathify = ChannelDuplicatingPixelShuffle3D(patch_channels, block_in, factor=2)
        self.mid = MidBlock3D(block_in, per_frame_norm)

        # `up` is indexed by level (up.0 = full resolution) and run from the last level down.
        levels = []
        for level in reversed(range(len(widths))):
            kind = "none" if level == 0 else ("3d" if level in temporal_up_layers else "2d")
            levels.append(DecoderLevel(block_in, widths[level], num_res_blocks + 1, kind, per_frame_norm))
            block_in = widths[level]
        self.up = nn.ModuleList(reversed(levels))

        self.norm_out = FrameGroupNorm(block_in, per_frame_norm)
        self.conv_out = CausalConv3d(block_in, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z, residual=self.shortcut_in(z))                     # [B, 32z, F, h, w]
        h = self.conv_unpatchify(h, residual=self.shortcut_unpathify(h))      # [B, C, 2F-1, 2h, 2w]
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)                                                      # -> [B, ch, 4(2F-1), 16h, 16w]
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))                           # [B, 3, 4(2F-1), H, W]
        return h[:, :, self.trim_frames:]                                     # [B, 3, 8F-7, H, W]

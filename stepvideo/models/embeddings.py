"""DiT input embeddings: patch embed, timestep/motion sinusoids, AdaLN-single, caption projection.

Key namespaces owned here: ``pos_embed.*``, ``adaln_single.*``, ``caption_projection.*``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SINUSOID_DIM = 256
TIMESTEP_SCALE = 1000


def sinusoid(values: torch.Tensor, dim: int = SINUSOID_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` in fp32 with the cosine half FIRST.

    ``f_k = exp(-ln(max_period) * k / (dim/2))``, ``k = 0 .. dim/2-1``; output
    ``[cos(v f), sin(v f)]``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    args = values.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """Per-frame 1x1 conv: ``[B, F, C, h, w] -> [B*F, h*w, D]`` (key ``proj``)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = x.shape
        x = self.proj(x.reshape(b * f, c, h, w))          # [B*F, D, h', w']
        return x.flatten(2).transpose(1, 2)               # [B*F, h'*w', D]


class TimestepEmbedder(nn.Module):
    """``Linear(256 -> D) -> SiLU -> Linear(D -> D)`` (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, dim: int, in_dim: int = SINUSOID_DIM):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ConditionEmbedding(nn.Module):
    """``adaln_single.emb``: the timestep embedder plus, in TI2V, the motion-score embedder."""

    def __init__(self, dim: int, use_motion_score: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.motion_score_embedder = TimestepEmbedder(dim) if use_motion_score else None

    def forward(self, timestep: torch.Tensor, motion_score: Optional[torch.Tensor]) -> torch.Tensor:
        # the x1000 happens in the timestep's own dtype (bf16 in production: rounded twice)
        tau = timestep * TIMESTEP_SCALE
        emb = self.timestep_embedder(sinusoid(tau))
        if self.motion_score_embedder is not None and motion_score is not None:
            emb = emb + self.motion_score_embedder(sinusoid(motion_score))   # no x1000
        return emb


class AdaLayerNormSingle(nn.Module):
    """AdaLN-single: ``t -> (M [B, 6D], E [B, D])`` (keys ``emb.*``, ``linear``).

    ``E`` is the embedded timestep (plus the motion embedding in TI2V); ``M = linear(SiLU(E))``
    holds shift/scale/gate for attention and FFN, in that order.
    """

    def __init__(self, dim: int, use_motion_score: bool = False):
        super().__init__()
        self.emb = ConditionEmbedding(dim, use_motion_score)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor,
                motion_score: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb(timestep, motion_score)
        return self.linear(F.silu(embedded)), embedded


class PixArtAlphaTextProjection(nn.Module):
    """Caption projection ``Linear -> GELU(tanh) -> Linear`` (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))

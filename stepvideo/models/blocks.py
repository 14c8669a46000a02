"""DiT transformer block: self-attention with QK-norm and 3D RoPE, cross-attention, GELU FFN.

Key namespace: ``transformer_blocks.{i}.*``. Layout letters: B batch, L tokens (local chunk
under sequence parallelism), Lkv text tokens, N heads, Dh head dim (128), D = N * Dh.

Head counts are read from the weight shapes at run time (``view(..., -1, ...)``), so
tensor-parallel shards that keep a subset of whole heads run through the same code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .norms import RMSNorm, rms_norm
from .parallel_hooks import LocalSequence
from .rope import apply_rope


# Small element-wise stages, written once and used by the eager and the compiled path
# (``stepvideo.perf.compile.compile_blocks``): torch.compile fuses each into one kernel; eager
# evaluates exactly the same ops in the same order, so both paths compute the same numbers.
def qk_norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """QK-norm (fp32 statistics, cast back, ``* weight``) then 3D RoPE, ``x [B, L, N, Dh]``."""
    return apply_rope(rms_norm(x, norm.weight, norm.eps), cos, sin)


def modulate(x_norm: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation in the reference order: ``x_norm * (1 + scale) + shift``."""
    return x_norm * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``gate * y + x`` (not ``addcmul``, whose fused rounding would change bf16 numbers)."""
    return gate * y + x


class SelfAttention(nn.Module):
    """``attn1``: fused per-head ``wqkv`` (rows ``[q_h | k_h | v_h]`` per head), QK-norm, RoPE."""

    def __init__(self, dim: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.head_dim = head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=eps)
        self.k_norm = RMSNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], backend: str,
                sequence=LocalSequence()) -> torch.Tensor:
        """``x [B, L, D]`` -> ``[B, L, D]``; ``rope`` = (cos, sin) rows of this chunk ``[L, Dh]``."""
        b, length, _ = x.shape
        qkv = self.wqkv(x).view(b, length, -1, 3 * self.head_dim)     # [B, L, N, 3Dh]
        q, k, v = qkv.split(self.head_dim, dim=-1)                     # [B, L, N, Dh] each
        q = qk_norm_rope(q, self.q_norm, *rope)
        k = qk_norm_rope(k, self.k_norm, *rope)
        out = sequence.attention(q, k, v, lambda q_, k_, v_: attention(q_, k_, v_, backend=backend))
        return self.wo(out.reshape(b, length, -1))                     # [B, L, N*Dh] -> [B, L, D]


class CrossAttention(nn.Module):
    """``attn2``: ``wq``, fused per-head ``wkv`` (rows ``[k_h | v_h]``), QK-norm, masked SDPA."""

    def __init__(self, dim: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=eps)
        self.k_norm = RMSNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``x [B, L, D]``, ``context [B, Lkv, D]``, ``mask [B, 1, 1, Lkv]`` bool -> ``[B, L, D]``."""
        b, length, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, length, -1, self.head_dim))           # [B, L, N, Dh]
        kv = self.wkv(context).view(b, context.shape[1], -1, 2 * self.head_dim)  # [B, Lkv, N, 2Dh]
        k, v = kv.split(self.head_dim, dim=-1)
        k = self.k_norm(k)
        out = attention(q, k, v, mask=mask, backend="sdpa")
        return self.wo(out.reshape(b, length, -1))


class GELUProjection(nn.Module):
    """``ff.net.0``: bias-free Linear followed by tanh-GELU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``ff.net = [GELUProjection, Identity (no keys), Linear]``: D -> 4D -> D, no biases."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, mult * dim), nn.Identity(),
                                  nn.Linear(mult * dim, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class StepVideoTransformerBlock(nn.Module):
    """Pre-norm DiT block with AdaLN-single modulation.

    ``x += g1 * SelfAttn(LN1(x) * (1 + c1) + s1)``; ``x += CrossAttn(x, context)`` (raw stream,
    no gate); ``x += g2 * FFN(LN2(x) * (1 + c2) + s2)``.
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.attn1 = SelfAttention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.attn2 = CrossAttention(dim, head_dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, modulation: torch.Tensor,
                cross_mask: Optional[torch.Tensor], rope: Tuple[torch.Tensor, torch.Tensor],
                backend: str = "sdpa", sequence=LocalSequence()) -> torch.Tensor:
        """``x [B, L, D]``, ``context [B, Lkv, D]``, ``modulation [B, 6D]`` -> ``[B, L, D]``."""
        b = x.shape[0]
        rows = self.scale_shift_table[None] + modulation.reshape(b, 6, -1)      # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = rows.chunk(6, dim=1)

        # 1. Self-attention
        h = modulate(self.norm1(x), scale_msa, shift_msa)
        x = gated_residual(x, gate_msa, self.attn1(h, rope, backend, sequence))
        # 2. Cross-attention on the un-normalised stream, no gate
        x = self.attn2(x, context, cross_mask) + x
        # 3. Feed-forward
        h = modulate(self.norm2(x), scale_mlp, shift_mlp)
        x = gated_residual(x, gate_mlp, self.ff(h))
        return x

"""DiT transformer block: self-attention with QK-norm and 3D RoPE, cross-attention, GELU FFN.

Key namespace: ``transformer_blocks.{i}.*``. Layout letters: B batch, L tokens (local chunk
under sequence parallelism), Lkv text tokens, N heads, Dh head dim (128), D = N * Dh.

Head counts are read from the weight shapes at run time (``view(..., -1, ...)``), so
tensor-parallel shards that keep a subset of whole heads run through the same code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .attention import attention
from .norms import RMSNorm, rms_norm_
from .parallel_hooks import LocalSequence
from .rope import apply_rope_, signed_sin_table


# Small element-wise stages, written once and used by the eager and the compiled path
# (``stepvideo.perf.compile.compile_blocks``). Eager runs them in place on tensors the block
# itself produced (never on the block input), with the reference's roundings in the reference's
# order: the same numbers in fewer full-size passes and without temporaries (an inference path:
# autograd through these in-place stages is not supported). torch.compile fuses each into one
# kernel.
def qk_norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """QK-norm (fp32 statistics, cast back, ``* weight``) then 3D RoPE, in place on ``x [B, L, N, Dh]``.

    ``signed_sin`` is :func:`~stepvideo.models.rope.signed_sin_table` of the RoPE sine table.
    """
    return apply_rope_(rms_norm_(x, norm.weight, norm.eps), cos, signed_sin)


def modulate(x_norm: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation in the reference order, in place on ``x_norm``: ``x_norm * (1 + scale) + shift``."""
    return x_norm.mul_(1 + scale).add_(shift)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``gate * y + x`` as a new tensor; ``y`` (a block temporary) is overwritten with ``gate * y``.

    Two roundings as the reference (not ``addcmul``, whose single rounding would change bf16
    numbers); IEEE addition and multiplication are commutative, so the operand order is free.
    """
    return x + y.mul_(gate)


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
        cos, sin = rope
        qkv = self.qkv(x, cos, signed_sin_table(sin))                  # [B, L, N, 3Dh]
        q, k, v = qkv.split(self.head_dim, dim=-1)                     # [B, L, N, Dh] each (views)
        out = sequence.attention(q, k, v, lambda q_, k_, v_: attention(q_, k_, v_, backend=backend))
        return self.wo(out.reshape(b, length, -1))                     # [B, L, N*Dh] -> [B, L, D]

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]`` -> ``qkv [B, L, N, 3Dh]`` with q and k QK-normed and rotated in place;
        ``cos``, ``signed_sin`` are the RoPE rows of these ``L`` tokens (token-wise: any token
        chunk gives the same rows, see :mod:`stepvideo.models.token_chunks`)."""
        b, length, _ = x.shape
        qkv = self.wqkv(x).view(b, length, -1, 3 * self.head_dim)
        q, k, _ = qkv.split(self.head_dim, dim=-1)
        qk_norm_rope(q, self.q_norm, cos, signed_sin)                  # in place inside qkv
        qk_norm_rope(k, self.k_norm, cos, signed_sin)
        return qkv


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

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor],
                backend: str = "sdpa") -> torch.Tensor:
        """``x [B, L, D]``, ``context [B, Lkv, D]``, ``mask [B, 1, 1, Lkv]`` bool -> ``[B, L, D]``.

        ``backend`` is the model's attention backend; a masked call on a flash backend runs
        SDPA (flash-attn takes no mask), see :func:`stepvideo.models.attention.attention`.
        """
        k, v = self.context_kv(context)
        return self.attend(x, k, v, mask, backend)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               backend: str = "sdpa") -> torch.Tensor:
        """``x [B, L, D]`` against the keys and values of :meth:`context_kv` -> ``[B, L, D]`` (the
        token-chunked block calls this once per chunk with the same ``k``, ``v``)."""
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, -1, self.head_dim)                        # [B, L, N, Dh]
        q = rms_norm_(q, self.q_norm.weight, self.q_norm.eps)
        out = attention(q, k, v, mask=mask, backend=backend)
        del q
        return self.wo(out.reshape(b, length, -1))

    def context_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``context [B, Lkv, D]`` -> QK-normed ``k`` and ``v`` ``[B, Lkv, N, Dh]`` (views of one tensor)."""
        kv = self.wkv(context).view(context.shape[0], context.shape[1], -1, 2 * self.head_dim)
        k, v = kv.split(self.head_dim, dim=-1)
        return rms_norm_(k, self.k_norm.weight, self.k_norm.eps), v


class GELUProjection(nn.Module):
    """``ff.net.0``: bias-free Linear followed by tanh-GELU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on the fresh [B, L, 4D] projection (the block's largest activation)
        return torch._C._nn.gelu_(self.proj(x), approximate="tanh")


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

        # 1. Self-attention (the block input x is read, never written)
        h = modulate(self.norm1(x), scale_msa, shift_msa)
        x = gated_residual(x, gate_msa, self.attn1(h, rope, backend, sequence))
        # 2. Cross-attention on the un-normalised stream, no gate (x is now the block's own tensor)
        x = x.add_(self.attn2(x, context, cross_mask, backend))
        # 3. Feed-forward
        h = modulate(self.norm2(x), scale_mlp, shift_mlp)
        return x.add_(self.ff(h).mul_(gate_mlp))

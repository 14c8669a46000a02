"""Causal attention with the square-root ALiBi bias (the Step-LLM attention op).

The reference calls a closed CUDA-only kernel for the Step-LLM attention. Its definition
(``../shared/spec/STEP_VIDEO_SPEC.md`` §6.2 and Appendix B.2) is plain causal softmax
attention with a per-head additive bias applied after the ``q·kᵀ·scale`` product::

    bias[h, i, j] = -m_h * sqrt(i - j)     for j <= i
                  = -inf                   for j >  i

with the ALiBi slopes ``m_h`` (:func:`alibi_slopes`). Positions are the absolute indices of
the (right-padded) sequence, so the bias depends only on the sequence length.

Here the op is one ``torch.nn.functional.scaled_dot_product_attention`` call with an additive
float bias, so it runs on every device and dtype. Scores, bias and softmax are computed in
float32 (flash-style kernels accumulate scores in fp32 and add the bias there too); the
result is cast back to the input dtype.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F


def alibi_slopes(num_heads: int) -> List[float]:
    """ALiBi slopes ``m_h`` for ``num_heads`` heads (Python floats, head order).

    With ``P = 2**floor(log2(n))``: ``m_h = (2**(-8/P))**(h+1)`` for ``h < P``; the remaining
    ``n - P`` heads take the odd powers ``(2**(-4/P))**1, **3, **5, ...`` in order.
    For ``n = 48``: ``P = 32``, heads 0..31 get ``2**(-(h+1)/4)`` and heads 32..47 get
    ``2**(-(2i+1)/8)``, ``i = 0..15`` (`../shared/spec/STEP_VIDEO_SPEC.md`, Appendix A).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (h + 1) for h in range(closest)]
    if closest < num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return slopes


def sqrt_alibi_bias(num_heads: int, seq_len: int, device: Optional[torch.device | str] = None,
                    slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive float32 bias ``(N, L, L)``: ``-m_h·sqrt(i-j)`` on and below the diagonal,
    ``-inf`` above it (causal)."""
    if slopes is None:
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
    else:
        slopes = slopes.to(device=device, dtype=torch.float32)
    pos = torch.arange(seq_len, device=device)
    distance = (pos[:, None] - pos[None, :]).to(torch.float32)               # (L, L), i - j
    causal = distance >= 0
    bias = -slopes[:, None, None] * distance.clamp(min=0).sqrt()[None]       # (N, L, L)
    return bias.masked_fill(~causal[None], float("-inf"))


def sqrt_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal sqrt-ALiBi attention.

    Args:
        q: ``[B, L, N, D]`` queries.
        k, v: ``[B, L, G, D]`` keys / values with ``G`` groups dividing ``N``; query head ``j``
            uses group ``j // (N / G)``.
        bias: optional precomputed :func:`sqrt_alibi_bias` ``(N, L, L)`` (share it across layers).
        dropout_p: attention dropout probability (applied whenever non-zero, as the reference
            op does).
        softmax_scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, L, N, D]`` in the dtype of ``q``.
    """
    batch, seq_len, num_heads, head_dim = q.shape
    groups = k.shape[2]
    if num_heads % groups:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value groups ({groups})")
    if bias is None:
        bias = sqrt_alibi_bias(num_heads, seq_len, device=q.device)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2).to(torch.float32) for t in (q, k, v))       # [B, N|G, L, D]
    if groups != num_heads:
        k = k.repeat_interleave(num_heads // groups, dim=1)                    # [B, N, L, D]
        v = v.repeat_interleave(num_heads // groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(device=q.device, dtype=torch.float32),
                                         dropout_p=dropout_p, scale=scale)  # [B, N, L, D]
    return out.transpose(1, 2).to(out_dtype)                                   # [B, L, N, D]

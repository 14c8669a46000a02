"""Analytic FLOP count of one DiT forward (2 * M * N * K per matmul; element-wise ops ignored).

Per layer and per sample, with L video tokens, Lkv text tokens, width D (= heads * 128):

==================  ===========================================  =====================
part                matmuls                                      FLOPs
==================  ===========================================  =====================
projections         self-attn ``wqkv`` (D -> 3D) and ``wo``       ``8 L D^2``
self-attention      ``Q K^T`` and ``P V`` over all L tokens       ``4 L^2 D``
cross-attention     ``wq``, ``wo`` (L rows), ``wkv`` (Lkv rows),  ``4 L D^2 + 4 Lkv D^2
                    ``Q K^T`` and ``P V`` against Lkv keys        + 4 L Lkv D``
FFN                 D -> 4D -> D                                  ``16 L D^2``
==================  ===========================================  =====================

``other`` is the patch embedding, output head and caption projections (once per forward).
Sequence / tensor parallelism divide the work evenly, so the total is per step for all ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..config import DiTConfig

_RELEASED = DiTConfig()        # the released 30B model


@dataclass(frozen=True)
class DiTShape:
    """Sizes that determine the cost of one DiT forward (defaults: the released model)."""

    tokens: int                 # L = latent frames * h * w, per sample
    text_tokens: int = 397      # Lkv = 77 CLIP + 320 LLM (the longest mask a prompt can give)
    width: int = _RELEASED.inner_dim                  # D
    layers: int = _RELEASED.num_layers
    batch: int = 2              # CFG batch
    in_channels: int = _RELEASED.in_channels
    caption_channels: int = _RELEASED.llm_channels
    clip_channels: int = _RELEASED.clip_channels

    @classmethod
    def from_config(cls, config: DiTConfig, tokens: int, text_tokens: int = 397, batch: int = 2) -> "DiTShape":
        """The cost-relevant sizes of ``config`` for ``tokens`` video tokens per sample
        (``stepvideo.geometry.token_count``)."""
        return cls(tokens=tokens, text_tokens=text_tokens, width=config.inner_dim, layers=config.num_layers,
                   batch=batch, in_channels=config.in_channels, caption_channels=config.llm_channels,
                   clip_channels=config.clip_channels or 0)


def layer_flops(s: DiTShape) -> Dict[str, float]:
    """FLOPs of one block for one sample, by part."""
    L, Lkv, D = s.tokens, s.text_tokens, s.width
    return {
        "projections": 2.0 * L * D * 3 * D + 2.0 * L * D * D,
        "self_attention": 2.0 * 2 * L * L * D,
        "cross_attention": 2.0 * L * D * D * 2 + 2.0 * Lkv * D * 2 * D + 2.0 * 2 * L * Lkv * D,
        "ffn": 2.0 * L * D * 4 * D * 2,
    }


def other_flops(s: DiTShape) -> float:
    """Patch embedding, output head, caption / CLIP projections, for one sample."""
    L, Lkv, D = s.tokens, s.text_tokens, s.width
    patch = 2.0 * L * s.in_channels * D
    head = 2.0 * L * D * s.in_channels
    llm_tokens = max(Lkv - 77, 0)
    caption = 2.0 * llm_tokens * (s.caption_channels * D + D * D) + 2.0 * 77 * s.clip_channels * D
    adaln = 2.0 * (256 * D + D * D + D * 6 * D)
    return patch + head + caption + adaln


def step_flops(s: DiTShape) -> Dict[str, float]:
    """Per forward (one denoising step with CFG batch ``s.batch``): parts summed over layers and batch."""
    per_layer = layer_flops(s)
    out = {k: v * s.layers * s.batch for k, v in per_layer.items()}
    out["other"] = other_flops(s) * s.batch
    out["total"] = sum(out.values())
    return out


def format_flops(s: DiTShape) -> str:
    per_layer = layer_flops(s)
    total = step_flops(s)
    lines = [f"FLOP model (2*M*N*K per matmul): L={s.tokens} Lkv={s.text_tokens} D={s.width} "
             f"layers={s.layers} batch={s.batch}",
             f"  {'part':<16}{'per layer, 1 sample':>22}{'per step (layers x batch)':>28}"]
    for k, v in per_layer.items():
        lines.append(f"  {k:<16}{v:>17.4e} FLOP{total[k]:>23.4e} FLOP")
    lines.append(f"  {'other':<16}{'':>22}{total['other']:>23.4e} FLOP")
    lines.append(f"  {'total':<16}{sum(per_layer.values()):>17.4e} FLOP{total['total']:>23.4e} FLOP")
    return "\n".join(lines)

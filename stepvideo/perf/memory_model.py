"""Per-GPU memory model of DiT inference: weights, activations, attention workspace.

Estimates for one rank of a layout with sequence-parallel degree ``sp`` (Ulysses), tensor-
parallel degree ``tp`` and ``batch`` samples per rank (2 = CFG batch; 1 with CFG parallelism).
``bytes_per_el`` is 2 for bf16. Numbers are in bytes; ``format_table`` prints GiB.

Weights (exact parameter count of the block layout)
    per block: ``16 D^2`` linear weights (wqkv 3, wo 1, wq 1, wkv 2, wo 1, FFN 4 + 4), sharded
    by TP, plus ``10 D + 512`` replicated norm / modulation parameters; outside the blocks:
    patch embedding, AdaLN-single, caption / CLIP projections and output head (replicated).
    FP8 weights (``--fp8``) store the sharded block linears in 1 byte (+ one fp32 scale per
    output channel).

Activations (inference, no autograd; ``Ll = ceil(L / sp)`` local tokens)
    The eager block works in place on tensors it made itself (RoPE, QK-norm, modulation,
    residuals, GELU), so two live sets compete. Self-attention: the block input ``x`` and the
    modulated ``h`` (``2 D`` per token), ``qkv`` (``3 D/tp``) and, when ``sp > 1``, the
    all-to-all send and receive buffers of ``q, k, v`` (``6 D/tp``):
    ``B * Ll * (2 D + (3 + 6 [sp>1]) D/tp) * bytes``. The FFN: the block input, the residual
    stream, ``h`` and the FFN output (``4 D``) beside the hidden units (``4 D/tp``):
    ``B * Ll * (4 D + 4 D/tp) * bytes``, the larger at SP 1. After the gather, the output head
    holds the full sequence on every rank: ``3 * B * L * D * bytes`` (gathered ``x``, its
    LayerNorm, the modulated copy).

Attention workspace (self-attention over the full sequence, ``N / (sp * tp)`` heads per rank)
    fused kernels (flash / cuDNN / memory-efficient): fp32 log-sum-exp, ``B * heads * L * 4``;
    the math backend materialises scores and probabilities: ``2 * B * heads * L^2 * bytes``.

A fixed ``overhead`` (CUDA context, allocator slack, cuBLAS workspace; default 2 GiB) is added
to the totals. "fits" compares against the usable memory of the cards (79 GiB of an 80 GB H100,
139 GiB of an H200), not their marketing size.

This is the quick analytic estimate. The measured numbers come from tracing the real modules at
full size (``benchmark/bench_memory.py``, :mod:`stepvideo.perf.memory_accounting`). Checked
against them at 544x992x204 (CFG batch 2, or 1 per rank with CFG parallelism; all SP x TP x CFG layouts of up to 8 GPUs, after the
leaner eager block of issue 16): ``weights + activations + attention_fused`` is within 1.5% of
the traced allocated peak in bf16 and within 2.6% with ``fp8=True``. The activation term alone
is within 1.5% without CFG parallelism and up to 16% low with CFG parallelism and SP > 1 (about
0.5 GiB the formulas leave out); ``bench_memory.py --layouts`` prints the comparison. Plan with the bench_memory numbers, which
docs/performance.md lists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

from ..config import DiTConfig

GIB = 1024 ** 3
_RELEASED = DiTConfig()        # the released 30B model


@dataclass(frozen=True)
class ModelDims:
    """The DiT sizes this model reads (defaults: the released T2V model); see :meth:`from_config`."""

    width: int = _RELEASED.inner_dim
    heads: int = _RELEASED.num_attention_heads
    layers: int = _RELEASED.num_layers
    in_channels: int = _RELEASED.in_channels
    out_channels: int = _RELEASED.out_channels
    caption_channels: int = _RELEASED.llm_channels
    clip_channels: int = _RELEASED.clip_channels
    head_dim: int = _RELEASED.attention_head_dim
    motion: bool = False       # TI2V condition embedder (AdaLN-single motion score)

    @classmethod
    def from_config(cls, config: DiTConfig) -> "ModelDims":
        return cls(width=config.inner_dim, heads=config.num_attention_heads, layers=config.num_layers,
                   in_channels=config.in_channels, out_channels=config.out_channels,
                   caption_channels=config.llm_channels, clip_channels=config.clip_channels or 0,
                   head_dim=config.attention_head_dim, motion=config.use_additional_conditions)


def block_linear_params(d: ModelDims) -> int:
    return 16 * d.width * d.width


def block_other_params(d: ModelDims) -> int:
    # scale_shift_table 6D, norm1/norm2 weight + bias 4D, four RMSNorm weights of head_dim
    return 10 * d.width + 4 * d.head_dim


def outer_params(d: ModelDims) -> int:
    D = d.width
    patch_in = d.in_channels * (2 if d.motion else 1)
    n = patch_in * D + D                                   # pos_embed (1x1 conv)
    n += (256 * D + D) + (D * D + D)                       # timestep embedder
    if d.motion:
        n += (256 * D + D) + (D * D + D)                   # motion-score embedder
    n += D * 6 * D + 6 * D                                 # adaln_single.linear
    n += 2 * D + D * d.out_channels + d.out_channels       # scale_shift_table, proj_out
    n += d.clip_channels * D + D                           # clip_projection
    n += d.caption_channels * D + D + D * D + D            # caption_projection
    return n


def total_params(d: ModelDims) -> int:
    return d.layers * (block_linear_params(d) + block_other_params(d)) + outer_params(d)


def estimate(tokens: int, *, sp: int = 1, tp: int = 1, batch: int = 2, dims: ModelDims = ModelDims(),
             bytes_per_el: int = 2, fp8: bool = False, text_tokens: int = 397,
             overhead: float = 2 * GIB) -> Dict[str, float]:
    """Bytes per rank: ``weights``, ``activations``, ``attention_fused``, ``attention_math``, totals."""
    if dims.heads % (sp * tp):
        raise ValueError(f"heads ({dims.heads}) must be divisible by sp * tp ({sp} * {tp})")
    D, L, B = dims.width, tokens, batch
    linear = dims.layers * block_linear_params(dims) / tp
    linear_bytes = linear * (1 if fp8 else bytes_per_el)
    if fp8:
        linear_bytes += dims.layers * 4 * (3 * D + D + D + 2 * D + D + 4 * D + D) / tp   # per-row fp32 scales
    replicated = dims.layers * block_other_params(dims) + outer_params(dims)
    weights = linear_bytes + replicated * bytes_per_el
    local = math.ceil(L / sp)
    attn_peak = B * local * (2 * D + (3 + (6 if sp > 1 else 0)) * D / tp)
    ffn_peak = B * local * (4 * D + 4 * D / tp)
    persistent = B * text_tokens * D * 3 + 2 * L * dims.head_dim    # context, cross K/V, RoPE tables
    block = (max(attn_peak, ffn_peak) + persistent) * bytes_per_el
    head = 3 * B * L * D * bytes_per_el
    activations = max(block, head)
    heads_local = dims.heads // (sp * tp)
    fused = B * heads_local * L * 4
    math_ws = 2 * B * heads_local * L * L * bytes_per_el
    return {"weights": weights, "activations": activations, "attention_fused": fused,
            "attention_math": math_ws, "overhead": overhead,
            "total_fused": weights + activations + fused + overhead,
            "total_math": weights + activations + math_ws + overhead}


def table(tokens: int, sps: Sequence[int] = (1, 2, 4, 8), tps: Sequence[int] = (1, 2), **kwargs) -> List[dict]:
    rows = []
    for tp in tps:
        for sp in sps:
            if kwargs.get("dims", ModelDims()).heads % (sp * tp):
                continue
            rows.append({"sp": sp, "tp": tp, **estimate(tokens, sp=sp, tp=tp, **kwargs)})
    return rows


def format_table(rows: Iterable[dict], gpu_gib: Sequence[float] = (79, 139)) -> str:
    rows = list(rows)
    if rows and max(r["total_fused"] - r["overhead"] for r in rows) < 0.1 * GIB:   # tiny configs: MiB
        return format_table_mib(rows)
    head = (f"{'SP':>3} {'TP':>3} {'weights':>9} {'activ.':>8} {'attn(fused)':>12} {'attn(math)':>11} "
            f"{'total(fused)':>13} " + " ".join(f"{'fits ' + str(int(g)) + 'G':>9}" for g in gpu_gib))
    lines = [head + "   (GiB per GPU)"]
    for r in rows:
        fits = " ".join(f"{'yes' if r['total_fused'] <= g * GIB else 'no':>9}" for g in gpu_gib)
        lines.append(f"{r['sp']:>3} {r['tp']:>3} {r['weights'] / GIB:>9.1f} {r['activations'] / GIB:>8.1f} "
                     f"{r['attention_fused'] / GIB:>12.3f} {r['attention_math'] / GIB:>11.0f} "
                     f"{r['total_fused'] / GIB:>13.1f} {fits}")
    return "\n".join(lines)


def format_table_mib(rows: Iterable[dict]) -> str:
    lines = [f"{'SP':>3} {'TP':>3} {'weights':>9} {'activ.':>8} {'attn(fused)':>12} {'attn(math)':>11}"
             "   (MiB per GPU, excluding the fixed overhead)"]
    for r in rows:
        lines.append(f"{r['sp']:>3} {r['tp']:>3} {r['weights'] / 2 ** 20:>9.2f} {r['activations'] / 2 ** 20:>8.2f} "
                     f"{r['attention_fused'] / 2 ** 20:>12.4f} {r['attention_math'] / 2 ** 20:>11.4f}")
    return "\n".join(lines)


def main() -> None:   # python -m stepvideo.perf.memory_model
    print(f"DiT parameters: {total_params(ModelDims()) / 1e9:.2f} B")
    print("bf16, 204x544x992 (75,888 tokens), CFG batch 2 (analytic estimate; measured numbers: "
          "python benchmark/bench_memory.py --profile 80g --layouts):")
    print(format_table(table(75888)))


if __name__ == "__main__":
    main()

"""Token-chunked DiT blocks: the token-wise parts of a block computed a chunk of tokens at a time.

``set_token_chunk(model, tokens)`` switches every block of ``model.transformer_blocks`` to
:class:`TokenChunkedBlock` (same parameters, keys and hooks; only ``forward`` differs);
``set_token_chunk(model, None)`` switches back. Layout letters as in :mod:`.blocks`
(``x [B, L, D]``, ``qkv [B, L, N, 3Dh]``); a chunk is ``tokens`` rows of the token axis ``L``.

What runs per chunk (each a function of its own tokens only):

* self-attention: LayerNorm, modulation, ``wqkv``, QK-norm and RoPE, written into one
  ``[B, L, N, 3Dh]`` buffer (the attention kernel needs every key); after the kernel, ``wo`` and
  the gated residual, written into the block's output;
* cross-attention: ``wq``, QK-norm, the masked attention of these queries over the text tokens
  (computed once per block), ``wo`` and the residual add;
* feed-forward: LayerNorm, modulation, ``D -> 4D`` GELU, ``4D -> D``, gate and residual.

So the full-size temporaries are the block input, the ``qkv`` buffer, the attention output and the
block output; the modulated copies, the ``[B, L, 4D]`` FFN hidden units and the projection
outputs exist one chunk at a time. The arithmetic is the unchunked block's, op for op, row for
row: on CPU the outputs are bit-identical in fp32 and bf16 for chunks of at least 8 tokens
(``tests/test_token_chunks.py``; a GEMM of 2 rows takes a different CPU kernel). On a GPU, cuBLAS
may pick another kernel for the smaller GEMM, which can move the last bit.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .attention import attention
from .blocks import StepVideoTransformerBlock, modulate
from .parallel_hooks import LocalSequence
from .rope import signed_sin_table

DEFAULT_TOKEN_CHUNK = 8192      # tokens per chunk (x CFG batch 2 = 16,384 GEMM rows: full-speed GEMMs)


def token_spans(length: int, tokens: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``tokens`` covering ``range(length)`` in order."""
    if tokens < 1:
        raise ValueError(f"token chunk must be at least 1, got {tokens}")
    return [(start, min(length, start + tokens)) for start in range(0, length, tokens)]


class TokenChunkedBlock(StepVideoTransformerBlock):
    """:class:`StepVideoTransformerBlock` whose token-wise parts run ``token_chunk`` tokens at a time."""

    token_chunk: int = DEFAULT_TOKEN_CHUNK

    def forward(self, x: torch.Tensor, context: torch.Tensor, modulation: torch.Tensor,
                cross_mask: Optional[torch.Tensor], rope: Tuple[torch.Tensor, torch.Tensor],
                backend: str = "sdpa", sequence=LocalSequence()) -> torch.Tensor:
        """``x [B, L, D]``, ``context [B, Lkv, D]``, ``modulation [B, 6D]`` -> ``[B, L, D]`` (a new tensor)."""
        b, length, _ = x.shape
        rows = self.scale_shift_table[None] + modulation.reshape(b, 6, -1)      # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = rows.chunk(6, dim=1)
        spans = token_spans(length, self.token_chunk)

        # 1. Self-attention: projections per chunk into one qkv buffer, one attention call
        attn1, dh = self.attn1, self.attn1.head_dim
        cos, sin = rope
        signed_sin = signed_sin_table(sin)
        qkv = None
        for start, stop in spans:
            h = modulate(self.norm1(x[:, start:stop]), scale_msa, shift_msa)
            part = attn1.qkv(h, cos[start:stop], signed_sin[start:stop])         # [B, c, N, 3Dh]
            del h
            if qkv is None:
                qkv = part.new_empty((b, length) + tuple(part.shape[2:]))
            qkv[:, start:stop] = part
            del part
        q, k, v = qkv.split(dh, dim=-1)
        del qkv
        out = sequence.attention(q, k, v, lambda q_, k_, v_: attention(q_, k_, v_, backend=backend))
        del q, k, v
        y = torch.empty_like(x)                                                  # the block output
        for start, stop in spans:
            o = attn1.wo(out[:, start:stop].reshape(b, stop - start, -1))
            torch.add(x[:, start:stop], o.mul_(gate_msa), out=y[:, start:stop])   # gated_residual, in y
            del o
        del out

        # 2. Cross-attention on the un-normalised stream, no gate; the text keys once per block
        attn2 = self.attn2
        k, v = attn2.context_kv(context)
        for start, stop in spans:
            y[:, start:stop].add_(attn2.attend(y[:, start:stop], k, v, cross_mask, backend))
        del k, v

        # 3. Feed-forward
        for start, stop in spans:
            chunk = y[:, start:stop]
            h = modulate(self.norm2(chunk), scale_mlp, shift_mlp)
            chunk.add_(self.ff(h).mul_(gate_mlp))
            del h
        return y


def set_token_chunk(model: nn.Module, tokens: Optional[int]) -> nn.Module:
    """Run every block of ``model.transformer_blocks`` in chunks of ``tokens`` tokens (None: whole)."""
    for block in model.transformer_blocks:
        if tokens is None:
            if isinstance(block, TokenChunkedBlock):
                block.__class__ = StepVideoTransformerBlock
                vars(block).pop("token_chunk", None)
        else:
            token_spans(1, tokens)                          # validates
            block.__class__ = TokenChunkedBlock
            block.token_chunk = tokens
    return model


def token_chunk_of(model: nn.Module) -> Optional[int]:
    """The token chunk the blocks of ``model`` run with (None: unchunked)."""
    blocks = model.transformer_blocks
    return blocks[0].token_chunk if len(blocks) and isinstance(blocks[0], TokenChunkedBlock) else None

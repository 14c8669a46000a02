"""Ulysses sequence parallelism with ``all_to_all_single`` (NCCL and gloo alike).

Implements the hook protocol of :class:`stepvideo.models.parallel_hooks.LocalSequence`:
each SP rank keeps a contiguous chunk of the tokens through the blocks; around
self-attention, one all-to-all turns ``[B, l_r, N, Dh]`` (my tokens, all heads) into
``[B, L, N/W, Dh]`` (all tokens, my heads), ``fn`` runs full attention on it, and a second
all-to-all turns the result back.

Uneven token counts (``W`` does not divide ``L``) are exact without padding: chunks are
balanced (the first ``L % W`` ranks hold one token more) and ``all_to_all_single`` is given
the per-rank sizes, so after the exchange every rank holds exactly the ``L`` real tokens.
No padded key can leak into the softmax, and the RoPE rows of ``split_range`` match the
tokens one to one. Only the final gather pads (to the longest chunk) and trims again.

One instance serves one forward at a time: ``split`` records the chunk lengths that
``attention`` and ``gather`` then use.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .state import chunk_lengths


class UlyssesSequence:
    """Sequence-parallel hooks over the process group ``group`` (None = the default group)."""

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("UlyssesSequence needs an initialised torch.distributed process group "
                               "(ParallelState.from_env); use LocalSequence for a single process")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._lengths: Optional[List[int]] = None

    # ---- token axis ---------------------------------------------------------------------
    def split_range(self, length: int) -> Tuple[int, int]:
        """Row range ``[start, stop)`` of this rank's chunk of a ``length``-token axis."""
        lengths = self._chunk_lengths(length)
        start = sum(lengths[: self.rank])
        return start, start + lengths[self.rank]

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> this rank's contiguous chunk ``[B, l_r, ...]``."""
        self._lengths = self._chunk_lengths(x.shape[1])
        start, stop = self.split_range(x.shape[1])
        return x[:, start:stop].contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, l_r, ...]`` on every rank -> ``[B, L, ...]`` (chunks in rank order) on every rank."""
        lengths = self._current_lengths(x.shape[1])
        longest = max(lengths)
        if x.shape[1] < longest:                                            # pad for all_gather
            pad = x.new_zeros((x.shape[0], longest - x.shape[1], *x.shape[2:]))
            x = torch.cat([x, pad], dim=1)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._all_gather(parts, x.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, lengths)], dim=1)

    # ---- attention ----------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Full-sequence attention of local chunks.

        ``q, k, v [B, l_r, N, Dh]`` -> all-to-all -> ``[B, L, N/W, Dh]`` -> ``fn`` ->
        all-to-all -> ``[B, l_r, N, Dh]``.
        """
        b, local, heads, head_dim = q.shape
        lengths = self._current_lengths(local)
        w = self.world_size
        if heads % w:
            raise ValueError(f"attention heads on this rank ({heads}) must be divisible by the sequence-parallel "
                             f"degree ({w})")
        # 1. sequence -> heads: send head group j of my tokens to rank j. q, k, v are copied
        #    straight into the send buffer (no stacked [3, ...] copy next to it), and every buffer
        #    is dropped as soon as the exchange that needed it is done: the peak inside this call
        #    is send + recv (3 x this rank's q size each), then recv + fn's output.
        group_heads = heads // w
        send = q.new_empty((w, local, 3, b, group_heads, head_dim))        # [W, l, 3, B, N/W, Dh]
        for index, part in enumerate((q, k, v)):
            send[:, :, index].copy_(part.unflatten(2, (w, group_heads)).permute(2, 1, 0, 3, 4))
        send = send.view(w * local, 3, b, group_heads, head_dim)
        recv = send.new_empty((sum(lengths), 3, b, group_heads, head_dim))  # [L, 3, B, N/W, Dh]
        self._all_to_all(recv, send, output_split_sizes=lengths, input_split_sizes=[local] * w)
        del send
        q_full, k_full, v_full = recv.permute(1, 2, 0, 3, 4).unbind(0)    # [B, L, N/W, Dh] each
        del recv

        out = fn(q_full, k_full, v_full)                                    # [B, L, N/W, Dh]
        del q_full, k_full, v_full                                          # frees the received q/k/v

        # 2. heads -> sequence: return every rank's tokens of my heads
        send = out.permute(1, 0, 2, 3).contiguous()                         # [L, B, N/W, Dh]
        del out
        recv = send.new_empty((w * local, b, group_heads, head_dim))
        self._all_to_all(recv, send, output_split_sizes=[local] * w, input_split_sizes=lengths)
        del send
        out = recv.view(w, local, b, group_heads, head_dim).permute(2, 1, 0, 3, 4)   # [B, l, W, N/W, Dh]
        return out.reshape(b, local, heads, head_dim)

    # ---- collectives (one place, so a subclass can account memory without a process group) --
    def _all_to_all(self, recv: torch.Tensor, send: torch.Tensor, *, output_split_sizes: List[int],
                    input_split_sizes: List[int]) -> None:
        dist.all_to_all_single(recv, send, output_split_sizes=output_split_sizes,
                               input_split_sizes=input_split_sizes, group=self.group)

    def _all_gather(self, parts: List[torch.Tensor], x: torch.Tensor) -> None:
        dist.all_gather(parts, x, group=self.group)

    # ---- helpers ------------------------------------------------------------------------
    def _chunk_lengths(self, length: int) -> List[int]:
        if length < self.world_size:
            raise ValueError(f"cannot split {length} tokens over {self.world_size} sequence-parallel ranks: "
                             "every rank needs at least one token")
        return chunk_lengths(length, self.world_size)

    def _current_lengths(self, local: int) -> List[int]:
        if self._lengths is None or self._lengths[self.rank] != local:
            raise RuntimeError(f"UlyssesSequence got a local chunk of {local} tokens that split() did not produce "
                               f"(last split: {self._lengths}); call split() first in every forward")
        return self._lengths

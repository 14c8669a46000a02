"""The seam between the single-rank DiT and sequence parallelism.

The DiT forward calls three hooks and nothing else parallel:

* ``split(x)``  after patchify: keep this rank's contiguous chunk of the token axis (dim 1);
* ``attention(q, k, v, fn)`` inside self-attention: exchange sequence <-> heads around ``fn``
  (Ulysses all-to-all), or just call ``fn``;
* ``gather(x)`` after the last block: concatenate the token chunks of all ranks in order.

``LocalSequence`` is the identity (world size 1). ``stepvideo.parallel`` provides the
multi-rank implementation of the same three methods; the model never imports it.
"""
from __future__ import annotations

from typing import Callable

import torch


class LocalSequence:
    """No sequence parallelism: every hook is the identity."""

    world_size = 1
    rank = 0

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(q, k, v)

    def split_range(self, length: int):
        """Row range ``[start, stop)`` of this rank's chunk of a ``length``-token axis."""
        return 0, length

"""``--cache KIND:VALUE``: diffusers' training-free step caches on our DiT, from the command line.

The spec is parsed by :mod:`stepvideo.config` (``SamplingConfig.cache`` is validated at construction) without importing diffusers (an optional extra); applying it imports
:mod:`stepvideo.diffusers.cache`, which registers our block with diffusers' block registry and
installs diffusers' own hooks. Kinds:

=============  =========================  ======================================================
spec           diffusers config           meaning of VALUE
=============  =========================  ======================================================
``fbc:T``      ``FirstBlockCacheConfig``  threshold on the first block's relative residual change
``taylorseer:N``  ``TaylorSeerCacheConfig``  recompute the attention every N steps, predict between
=============  =========================  ======================================================

``None`` / ``"none"`` / ``"off"`` mean no cache: the model is not touched (bit-for-bit the same).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from ..config import CacheSpec, parse_cache  # noqa: F401  (the spec lives in the config; callers name CacheSpec here)


@contextmanager
def cache_applied(model, text: Optional[str], group=None) -> Iterator[Optional[object]]:
    """Install the cache named by ``text`` on ``model`` (a ``StepVideoModel``) for the block of
    code, then remove it. ``group``: the process group whose ranks must skip the same steps (all
    ranks running this model). With no cache, yields ``None`` and changes nothing."""
    spec = parse_cache(text)
    if spec is None:
        yield None
        return
    # optional dependency: diffusers is imported only when a cache is asked for
    from ..diffusers.cache import apply_cache, cache_config

    active = apply_cache(model, cache_config(spec.kind, spec.value), group=group)
    try:
        yield active
    finally:
        active.remove()


class BlockEvaluations:
    """Counts what a cache skips, by forward hooks on modules that run only when really computed:
    ``blocks`` (a block's first norm: FBC / MagCache skip whole blocks) and ``attention``
    (self- and cross-attention input projections: TaylorSeer predicts attention outputs)."""

    def __init__(self, model):
        self.blocks = 0
        self.attention = 0
        self._handles = []
        for block in model.transformer_blocks:
            self._handles.append(block.norm1.register_forward_hook(self._count_block))
            for projection in (block.attn1.wqkv, block.attn2.wq):
                self._handles.append(projection.register_forward_hook(self._count_attention))

    def _count_block(self, *_):
        self.blocks += 1

    def _count_attention(self, *_):
        self.attention += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

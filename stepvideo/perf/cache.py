"""``--cache KIND:VALUE``: diffusers' training-free step caches on our DiT, from the command line.

The spec is parsed here without importing diffusers (an optional extra); applying it imports
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

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

CACHE_KINDS = {"fbc": "threshold", "taylorseer": "interval"}
OFF = ("", "none", "off")


@dataclass(frozen=True)
class CacheSpec:
    """One parsed ``--cache`` value."""

    kind: str
    value: float

    def __str__(self) -> str:
        value = int(self.value) if self.kind == "taylorseer" else self.value
        return f"{self.kind}:{value}"


def parse_cache(text: Optional[str]) -> Optional[CacheSpec]:
    """``"fbc:0.03"`` -> ``CacheSpec("fbc", 0.03)``; off values -> ``None``.

    Raises ``ValueError`` (naming the flag) for an unknown kind, a bad value, or diffusers missing.
    """
    if text is None or text.strip().lower() in OFF:
        return None
    kind, _, raw = text.strip().partition(":")
    kind = kind.lower()
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache {text!r}: unknown kind {kind!r}; use one of "
                         f"{', '.join(f'{k}:<{v}>' for k, v in CACHE_KINDS.items())} or 'none'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"cache {text!r}: the {CACHE_KINDS[kind]} after '{kind}:' must be a number") from None
    if kind == "fbc" and not value >= 0:
        raise ValueError(f"cache {text!r}: the threshold must be >= 0")
    if kind == "taylorseer" and (value != int(value) or value < 1):
        raise ValueError(f"cache {text!r}: the interval must be an integer >= 1")
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError(f"cache {text!r} needs diffusers: pip install 'stepvideo[diffusers]'")
    return CacheSpec(kind, value)


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

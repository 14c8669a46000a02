"""3D rotary position embedding of the DiT self-attention.

The 128 head channels are split ``[64, 32, 32]`` for (frame, row, column). Within a chunk of
width ``D`` the inverse frequencies are ``10000 ** (-2k / D)``; angles ``p * theta`` are
computed in fp32, then cast to the token dtype BEFORE cos/sin (a bf16 quirk of the
reference that changes numbers), and the rotate-half convention is used per chunk.

Tables are built for the full token list of a latent grid ``(F, h, w)`` in frame-major
order; sequence-parallel ranks take the same contiguous row range as their tokens.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

ROPE_SPLIT = (64, 32, 32)
ROPE_BASE = 10000.0


def _axis_table(length: int, dim: int, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions ``0..length-1`` of one chunk: each ``[length, dim]`` in ``dtype``."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq).to(dtype)            # [P, dim/2], rounded to token dtype
    angles = torch.cat([angles, angles], dim=-1)              # [P, dim]
    return angles.cos(), angles.sin()


class RoPE3D:
    """Builds and caches ``(cos, sin)`` tables of shape ``[L, 128]`` per (grid, dtype, device).

    The cache is a plain per-instance dict (no module buffers), so models built on the meta
    device need no re-materialisation.
    """

    def __init__(self, split: Sequence[int] = ROPE_SPLIT, max_cache: int = 8):
        self.split = tuple(split)
        self.head_dim = sum(self.split)
        self._cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_cache = max_cache

    def tables(self, grid: Sequence[int], dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[F*h*w, head_dim]`` in ``dtype``, token order frame-major."""
        key = (tuple(grid), dtype, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        frames, rows, cols = grid
        length = max(frames, rows, cols)   # one shared table length, as the reference
        cos_parts, sin_parts = [], []
        axis_len = (frames, rows, cols)
        for axis, dim in enumerate(self.split):
            cos, sin = _axis_table(length, dim, dtype, device)
            shape = [1, 1, 1, dim]
            shape[axis] = axis_len[axis]
            expand = (frames, rows, cols, dim)
            cos_parts.append(cos[: axis_len[axis]].view(shape).expand(expand))
            sin_parts.append(sin[: axis_len[axis]].view(shape).expand(expand))
        cos = torch.cat(cos_parts, dim=-1).reshape(frames * rows * cols, self.head_dim)
        sin = torch.cat(sin_parts, dim=-1).reshape(frames * rows * cols, self.head_dim)
        if len(self._cache) >= self._max_cache:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (cos, sin)
        return cos, sin


def rotate_half_chunks(x: torch.Tensor, split: Sequence[int] = ROPE_SPLIT) -> torch.Tensor:
    """``[u, v] -> [-v, u]`` inside each chunk of the last dim."""
    out = []
    for chunk in x.split(list(split), dim=-1):
        u, v = chunk.chunk(2, dim=-1)
        out.append(torch.cat([-v, u], dim=-1))
    return torch.cat(out, dim=-1)


_PARTNERS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _partner_and_sign(split: Tuple[int, ...], device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Channel permutation and sign with ``rotate_half_chunks(x) == x[..., perm] * sign`` (cached)."""
    hit = _PARTNERS.get((split, device))
    if hit is not None:
        return hit
    perm, sign, offset = [], [], 0
    for dim in split:
        half = dim // 2
        perm += [offset + half + i for i in range(half)] + [offset + i for i in range(half)]
        sign += [-1.0] * half + [1.0] * half
        offset += dim
    hit = (torch.tensor(perm, dtype=torch.long, device=device),
           torch.tensor(sign, dtype=torch.float32, device=device))
    _PARTNERS[(split, device)] = hit
    return hit


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               split: Sequence[int] = ROPE_SPLIT) -> torch.Tensor:
    """Rotate ``x [B, L, N, D]`` with tables ``cos, sin [L, D]`` (same dtype as ``x``).

    Computes ``x * cos + rotate_half_chunks(x) * sin`` as ``x * cos + x[..., perm] * (sign * sin)``:
    one gather instead of six slices and four concatenations. Bit-identical, because
    ``(-a) * b == a * (-b)`` exactly in IEEE arithmetic and ``sign * sin`` only flips signs.
    """
    perm, sign = _partner_and_sign(tuple(split), str(x.device))
    signed_sin = sin * sign.to(sin.dtype)
    return x * cos[None, :, None, :] + x[..., perm] * signed_sin[None, :, None, :]


def signed_sin_table(sin: torch.Tensor, split: Sequence[int] = ROPE_SPLIT) -> torch.Tensor:
    """``sin [L, D]`` with the first half of every chunk negated (the sign of rotate-half)."""
    _, sign = _partner_and_sign(tuple(split), str(sin.device))
    return sin * sign.to(sin.dtype)


def _half_chunks(split: Sequence[int]):
    """``(dst, src)`` channel slices of rotate-half: ``rotated[dst] = x[src] * signed_sin[dst]``."""
    pairs, offset = [], 0
    for dim in split:
        half = dim // 2
        first, second = slice(offset, offset + half), slice(offset + half, offset + dim)
        pairs += [(first, second), (second, first)]
        offset += dim
    return pairs


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                split: Sequence[int] = ROPE_SPLIT) -> torch.Tensor:
    """In-place 3D RoPE of ``x [B, L, N, D]`` (any strides) with ``cos, signed_sin [L, D]``; returns ``x``.

    Bit-identical to :func:`apply_rope` (the same three roundings: ``x * cos``,
    ``rotate_half(x) * sin`` and their sum) in three passes: the rotated product is written
    half-chunk by half-chunk from strided views of ``x`` (no gathered copy), then
    ``x *= cos; x += rotated``.
    """
    signed_sin = signed_sin[None, :, None, :]
    if torch.compiler.is_compiling():
        # Dynamo cannot trace out= into strided views; Inductor fuses the gather form anyway
        perm, _ = _partner_and_sign(tuple(split), str(x.device))
        rotated = x[..., perm] * signed_sin
    else:
        rotated = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for dst, src in _half_chunks(split):
            torch.mul(x[..., src], signed_sin[..., dst], out=rotated[..., dst])
    return x.mul_(cos[None, :, None, :]).add_(rotated)

"""Deterministic random initialisation for tiny test models.

Every tensor is drawn from its own generator seeded by ``(seed, parameter name)``, so a
model's weights do not depend on construction order or on which other modules exist.
The rule (the one the golden vectors use): weights with ``ndim >= 2`` ~ N(0, 1/sqrt(fan_in));
embedding tables ~ N(0, 1); ``*scale_shift_table`` ~ N(0, 0.1); 1-D norm weights ~ 1 + N(0, 0.1);
biases ~ N(0, 0.05).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, embedding_std: float = 1.0) -> nn.Module:
    """Fill every parameter of ``model`` in place (CPU, any dtype) following the module rule."""
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        g = _generator(seed, name)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name in embeddings:
            value = noise * embedding_std
        elif name.endswith("scale_shift_table"):
            value = noise * 0.1
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            value = noise / fan_in ** 0.5
        elif name.endswith("bias"):
            value = noise * 0.05
        else:  # 1-D norm weights
            value = 1.0 + noise * 0.1
        p.copy_(value.to(p.dtype))
    return model

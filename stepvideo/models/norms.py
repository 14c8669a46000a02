"""Normalisation helpers with the reference's exact evaluation order.

``rms_norm`` is the DiT/LLM RMSNorm: statistics in fp32, result cast back to the input dtype,
THEN multiplied by the weight in that dtype (the order matters in bf16).
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any layout ``[..., C]``)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight of size ``dim`` (key: ``weight``)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

"""Normalisation helpers with the reference's exact evaluation order.

``rms_norm`` is the DiT/LLM RMSNorm: statistics in fp32, result cast back to the input dtype,
THEN multiplied by the weight in that dtype (the order matters in bf16).

``rms_norm_`` is the same formula for the DiT's QK-norm, evaluated in place in three passes
over ``x`` instead of eight (see its docstring for the one rounding it moves).
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any layout ``[..., C]``)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def rms_norm_(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """In-place RMSNorm over the last dim of ``x [..., C]`` (any strides); returns ``x``.

    Passes over ``x``:

    1. ``||x||_2`` per row in fp32 (``vector_norm(dtype=float32)``: on CUDA one read of the
       bf16 input with an fp32 accumulator, no fp32 copy of ``x``);
       ``r = rsqrt(||x||^2 / C + eps)`` on the ``[..., 1]`` statistics, in fp32;
    2. ``x *= r``: a bf16 ``x`` times an fp32 ``r`` is computed in fp32 and rounded once to
       ``x.dtype``, which is exactly the reference's ``(x.float() * r).to(x.dtype)``;
    3. ``x *= weight`` in ``x.dtype`` (cast back first, then the weight, as the reference).

    The only difference from :func:`rms_norm` is the mean of squares (``sqrt(s)^2 / C`` with the
    norm kernel's summation order instead of ``s / C`` with the mean kernel's): ``r`` moves by at
    most ~2 fp32 ulps (relative 3e-7), which changes about 5 in 10^6 bf16 outputs by one bf16
    ulp (docs/performance.md, "bf16 bits"); fp32 outputs move by ~4e-7 relative.
    """
    norm = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True, dtype=torch.float32)   # [..., 1]
    scale = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))
    x.mul_(scale)
    if weight is not None:
        x.mul_(weight)
    return x


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight of size ``dim`` (key: ``weight``)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

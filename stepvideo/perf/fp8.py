"""FP8 (e4m3) weights for the DiT block linears, per-output-channel scales.

``quantize_blocks(model)`` replaces every plain ``nn.Linear`` inside ``model.transformer_blocks``
by an :class:`FP8Linear` holding ``weight`` in ``torch.float8_e4m3fn`` and ``weight_scale``
(fp32, one per output row, ``amax(row) / 448``). Halves the block weight memory of bf16.

Forward
    * CUDA with compute capability >= 8.9 (Hopper sm_90, Ada), bf16/fp16 input, sizes multiple
      of 16: activations are quantized per token (row-wise dynamic scale) and multiplied with
      ``torch._scaled_mm`` (row-wise scales, fp32 accumulation, output in the input dtype).
    * Elsewhere (CPU, older GPUs, odd sizes): weights are dequantized to the input dtype and a
      normal matmul runs (weight-only quantization; the CPU tests use this path).
The two paths differ by the activation rounding of the first one.

Tensor-parallel ``RowParallelLinear`` (a subclass, it all-reduces) is left untouched.
"""
from __future__ import annotations

import logging
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)     # 448


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (fp8 ``[out, in]``, fp32 scales ``[out]``) with ``w ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_scaled_mm") and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0


class FP8Linear(nn.Module):
    """A bias-optional Linear with fp8 weights and per-output-channel scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if scaled_mm_supported(x, self.weight):
            return self._scaled_mm(x)
        w = dequantize_weight(self.weight, self.weight_scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)   # [M, 1]
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :],
                               bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3fn"


@torch.no_grad()
def quantize_blocks(model: nn.Module) -> int:
    """Replace the plain ``nn.Linear`` modules of ``model.transformer_blocks``; returns the count."""
    count = 0
    for block in model.transformer_blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, child_name, FP8Linear.from_linear(child))
                    count += 1
    logger.info("fp8: quantized %d block linears", count)
    return count

"""FP8 (e4m3) weights for the DiT block linears, per-output-channel scales.

``quantize_blocks(model)`` replaces every plain ``nn.Linear`` inside ``model.transformer_blocks``
by an :class:`FP8Linear` holding ``weight`` in ``torch.float8_e4m3fn`` and ``weight_scale``
(fp32, one per output row, ``amax(row) / 448``). Halves the block weight memory of bf16.

Forward
    * CUDA with compute capability >= 8.9 (Hopper sm_90, Ada), bf16/fp16 input, sizes multiple
      of 16: activations are quantized per token (row-wise dynamic scale) and multiplied with
      ``torch._scaled_mm`` (row-wise scales, fp32 accumulation, output in the input dtype).
      Quantisation and matmul run in token chunks written into one preallocated output, so the
      temporaries (fp32 copy, fp8 copy) are bounded by :func:`chunk_rows` instead of being 4x
      the input: the layer peaks no higher than its bf16 ``F.linear`` (input + output + a bf16
      weight twice the fp8 one). Rows are quantized independently, so chunking does not change
      a number. ``FP8Linear.scaled_mm = True`` forces this path where ``torch._scaled_mm``
      exists (CPU too: used by the memory accounting and the tests).
    * Elsewhere (CPU, older GPUs, odd sizes): weights are dequantized to the input dtype and a
      normal matmul runs (weight-only quantization; the CPU tests use this path).
The two paths differ by the activation rounding of the first one.

Tensor-parallel ``RowParallelLinear`` (a subclass, it all-reduces) is left untouched.

A folder written by ``python -m stepvideo.quantize`` stores these fp8 weights and scales once;
``StepVideoModel.from_pretrained`` fills :func:`install_fp8_shells` with them as stored
(:mod:`stepvideo.loading.fp8_checkpoint`), so nothing is quantised at load time.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .accelerator import accelerator

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


# Bytes of chunk temporaries (fp32 + fp8 copy of a row chunk) allowed per call, at most; the
# actual bound is also capped by the bytes the fp8 weight saves over bf16 (see ``chunk_rows``).
CHUNK_TEMP_BYTES = 64 * 2 ** 20
TEMP_BYTES_PER_ELEMENT = 5          # fp32 copy (4) + fp8 copy (1) of each activation element


def chunk_rows(rows: int, in_features: int, out_features: int, limit: int = CHUNK_TEMP_BYTES) -> int:
    """Rows quantized per chunk: temporaries ``rows * in * 5`` bytes stay under ``limit`` and under
    half of the ``in * out`` bytes the fp8 weight saves against bf16 (the other half covers the
    weight scales and the per-row activation scales), so the fp8 layer's peak never exceeds the
    bf16 layer's. At least one row."""
    budget = min(limit, in_features * out_features // 2)
    return max(1, min(rows, budget // (TEMP_BYTES_PER_ELEMENT * in_features)))


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (fp8 ``[M, K]``, fp32 per-row scales ``[M, 1]``), ``x ~= q * scale``."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)   # [M, 1]
    xf = x.float()
    xf.div_(scale).clamp_(-FP8_MAX, FP8_MAX)          # in place: one fp32 temporary, same numbers
    return xf.to(FP8), scale


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_scaled_mm") and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if accelerator().capability(x.device) < (8, 9):
        return False
    return q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0


class FP8Linear(nn.Module):
    """A bias-optional Linear with fp8 weights and per-output-channel scales.

    ``scaled_mm``: None (default) picks the scaled-matmul path by :func:`scaled_mm_supported`;
    True forces it (any device where ``torch._scaled_mm`` runs, e.g. CPU); False forces the
    dequantizing fallback.
    """

    scaled_mm = None

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
        use = self.scaled_mm if self.scaled_mm is not None else scaled_mm_supported(x, self.weight)
        if use:
            return self._scaled_mm(x)
        w = dequantize_weight(self.weight, self.weight_scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]``: per-token fp8 quantisation and ``_scaled_mm`` in row chunks."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                                      # [M, K]
        rows = x2.shape[0]
        out = x2.new_empty((rows, self.out_features))                                      # [M, N]
        weight_t = self.weight.t()
        scale_b = self.weight_scale[None, :]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        step = chunk_rows(rows, self.in_features, self.out_features)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            xq, x_scale = quantize_rows(x2[start:stop])
            torch._scaled_mm(xq, weight_t, scale_a=x_scale, scale_b=scale_b, bias=bias, out_dtype=x.dtype,
                             out=out[start:stop])
            del xq, x_scale
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3fn"


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Module, str, nn.Linear]]:
    """Every plain ``nn.Linear`` inside ``model.transformer_blocks`` (the ones fp8 quantises), as
    ``(state-dict name, parent module, attribute name, linear)`` in module order."""
    found = []
    for index, block in enumerate(model.transformer_blocks):
        for path, module in block.named_modules():
            for child_name, child in module.named_children():
                if type(child) is nn.Linear:
                    name = ".".join(p for p in ("transformer_blocks", str(index), path, child_name) if p)
                    found.append((name, module, child_name, child))
    return found


@torch.no_grad()
def quantize_blocks(model: nn.Module) -> int:
    """Replace the plain ``nn.Linear`` modules of ``model.transformer_blocks``; returns the count."""
    linears = block_linears(model)
    for _, parent, child_name, child in linears:
        setattr(parent, child_name, FP8Linear.from_linear(child))
    if linears or not any(isinstance(m, FP8Linear) for m in model.transformer_blocks.modules()):
        logger.info("fp8: quantized %d block linears", len(linears))
    else:
        logger.info("fp8: the block linears are fp8 already (loaded as stored), nothing to quantize")
    return len(linears)


def install_fp8_shells(model: nn.Module) -> List[str]:
    """Swap the block linears of a ``meta`` model for :class:`FP8Linear` shells (fp8 ``weight
    [out, in]``, fp32 ``weight_scale [out]``, the linear's bias) that an fp8 checkpoint fills;
    returns their names."""
    names = []
    for name, parent, child_name, child in block_linears(model):
        device = child.weight.device
        q = torch.empty(child.out_features, child.in_features, dtype=FP8, device=device)
        scale = torch.empty(child.out_features, dtype=torch.float32, device=device)
        setattr(parent, child_name, FP8Linear(q, scale, child.bias))
        names.append(name)
    return names

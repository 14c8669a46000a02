"""One attention function with backends chosen at construction time.

Layout everywhere: ``q [B, Lq, N, D]``, ``k, v [B, Lk, N, D]`` -> ``out [B, Lq, N, D]``.

Backends
--------
``sdpa``            torch ``scaled_dot_product_attention``, PyTorch picks the kernel (CPU and
                    GPU; supports masks).
``sdpa-flash``      SDPA restricted to one kernel with ``torch.nn.attention.sdpa_kernel``
``sdpa-cudnn``      (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION, MATH). On CPU
``sdpa-efficient``  tensors, or with a mask, the restriction is dropped (plain ``sdpa``), so
``sdpa-math``       every backend runs everywhere.
``flash``           flash-attn, v3 (``flash_attn_interface``) preferred, else v2 (``flash_attn``).
``flash3``/``flash2`` one specific flash-attn major version.
                    flash-attn is probed lazily with ``importlib.util.find_spec``; a broken
                    install is logged and disabled, never raised at import.
``auto``            resolved by :func:`resolve_backend` when a module is built:
                    ``flash3`` on Hopper (sm_90) when flash-attn 3 is importable (the fastest
                    bf16 attention there), else ``flash2`` on CUDA when flash-attn 2 is
                    importable, else ``sdpa`` (which itself dispatches to the flash / cuDNN /
                    memory-efficient kernels on CUDA).

A call that a backend cannot serve (a mask, CPU tensors or fp32 for ``flash*``) falls back to
``sdpa``, which computes the same operation.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
FLASH_MODULES = {"flash3": ("flash_attn_interface",), "flash2": ("flash_attn",),
                 "flash": ("flash_attn_interface", "flash_attn")}
BACKENDS = ("auto", "sdpa", *SDPA_KERNELS, *FLASH_MODULES)


@functools.lru_cache(maxsize=None)
def _flash_attn_func(backend: str = "flash") -> Optional[Callable]:
    """Return flash-attn's ``flash_attn_func`` for ``backend`` or None, importing at most once."""
    for module_name in FLASH_MODULES[backend]:
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
            return module.flash_attn_func
        except (ImportError, OSError, RuntimeError, AttributeError) as err:
            logger.warning("flash attention backend %s disabled: %s", module_name, err)
    return None


def flash_available(backend: str = "flash") -> bool:
    return torch.cuda.is_available() and _flash_attn_func(backend) is not None


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def resolve_backend(name: str = "auto") -> str:
    """Turn a backend request into a concrete backend name; raise for unknown or missing ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        if _is_hopper() and flash_available("flash3"):
            return "flash3"
        if flash_available("flash2"):
            return "flash2"
        return "sdpa"
    if name in FLASH_MODULES and _flash_attn_func(name) is None:
        raise RuntimeError(f"attention backend {name!r} requested but flash-attn is not importable: "
                           "`pip install flash-attn --no-build-isolation` on a CUDA host, or use 'sdpa'")
    return name


def _sdpa_context(backend: str, q: torch.Tensor, mask):
    if backend not in SDPA_KERNELS or not q.is_cuda or mask is not None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[backend]))


def _sdpa(q, k, v, mask, scale, backend="sdpa"):
    # [B, L, N, D] -> [B, N, L, D]
    with _sdpa_context(backend, q, mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale + mask) v`` per head.

    Args:
        q: ``[B, Lq, N, D]``; k, v: ``[B, Lk, N, D]``.
        mask: optional boolean ``[B, 1 | N, Lq | 1, Lk]`` (True = attend) or additive float mask.
        scale: softmax scale, default ``D ** -0.5``.
        backend: a name resolved by :func:`resolve_backend`.
    Returns:
        ``[B, Lq, N, D]`` in the dtype of ``q``.
    """
    if (backend in FLASH_MODULES and mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        fn = _flash_attn_func(backend)
        if fn is not None:
            out = fn(q, k, v, softmax_scale=scale)
            return out[0] if isinstance(out, tuple) else out
    return _sdpa(q, k, v, mask, scale, backend)

"""One attention function with backends chosen at construction time.

Layout everywhere: ``q [B, Lq, N, D]``, ``k, v [B, Lk, N, D]`` -> ``out [B, Lq, N, D]``.

Backends
--------
``sdpa``   torch ``scaled_dot_product_attention`` (default; CPU and GPU; supports masks).
``flash``  flash-attn 2/3 when importable (CUDA, fp16/bf16, no mask). Probed lazily with
           ``importlib.util.find_spec``; a broken install is logged and disabled, never raised
           at import.
``auto``   resolved by :func:`resolve_backend` when a module is built: ``flash`` if CUDA and
           flash-attn are available, else ``sdpa``.

A call that a backend cannot serve (a mask, CPU tensors or fp32 for ``flash``) falls back to
``sdpa``, which computes the same operation.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash")


@functools.lru_cache(maxsize=None)
def _flash_attn_func() -> Optional[Callable]:
    """Return flash-attn's ``flash_attn_func`` (v3 preferred) or None, importing at most once."""
    for module_name in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
            return module.flash_attn_func
        except (ImportError, OSError, RuntimeError, AttributeError) as err:
            logger.warning("flash attention backend %s disabled: %s", module_name, err)
    return None


def flash_available() -> bool:
    return torch.cuda.is_available() and _flash_attn_func() is not None


def resolve_backend(name: str = "auto") -> str:
    """Turn a backend request into a concrete backend name; raise for unknown or missing ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash" if flash_available() else "sdpa"
    if name == "flash" and _flash_attn_func() is None:
        raise RuntimeError("attention backend 'flash' requested but flash-attn is not importable: "
                           "`pip install flash-attn --no-build-isolation` on a CUDA host, or use 'sdpa'")
    return name


def _sdpa(q, k, v, mask, scale):
    # [B, L, N, D] -> [B, N, L, D]
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
        backend: a name resolved by :func:`resolve_backend` (``sdpa`` or ``flash``).
    Returns:
        ``[B, Lq, N, D]`` in the dtype of ``q``.
    """
    if (backend == "flash" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        fn = _flash_attn_func()
        if fn is not None:
            out = fn(q, k, v, softmax_scale=scale)
            return out[0] if isinstance(out, tuple) else out
    return _sdpa(q, k, v, mask, scale)

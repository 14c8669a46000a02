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
``auto``            resolved once, when the model is built, by :func:`choose_backend` from the
                    CUDA device capability and the flash-attn packages that import:

                    =====================  ==========================  ===========
                    GPU family             package importable          ``auto``
                    =====================  ==========================  ===========
                    Hopper (sm_90)         flash-attn 3                ``flash3``
                    Ampere / Ada (sm_8x)   flash-attn 2                ``flash2``
                    any other CUDA GPU,    --                          ``sdpa``
                    or the package above
                    missing
                    no CUDA (CPU)          --                          ``sdpa``
                    =====================  ==========================  ===========

                    ``sdpa`` on CUDA lets PyTorch pick its flash / cuDNN / memory-efficient
                    kernel. The choice is logged once at INFO (``attention backend: ...``).

Self- and cross-attention go through :func:`attention` with the model's backend. A call that a
backend cannot serve (a mask, as in cross-attention, CPU tensors or fp32 for ``flash*``) runs
``sdpa``, which computes the same operation.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from typing import Callable, Collection, Optional, Tuple

import torch
import torch.nn.functional as F

from ..accelerator import accelerator

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


FLASH_INSTALL_HINT = {
    "flash3": "flash-attn 3 (module flash_attn_interface): build `hopper/` of "
              "https://github.com/Dao-AILab/flash-attention (`python setup.py install`) on a Hopper host",
    "flash2": "flash-attn 2 (module flash_attn): `pip install flash-attn --no-build-isolation` on a CUDA host",
    "flash": "flash-attn 2 or 3: `pip install flash-attn --no-build-isolation` on a CUDA host",
}


def flash_available(backend: str = "flash") -> bool:
    return accelerator().is_available() and _flash_attn_func(backend) is not None


def choose_backend(capability: Optional[Tuple[int, int]], importable: Collection[str]) -> str:
    """What ``auto`` means on a device: a pure function of the facts, so it is testable anywhere.

    Args:
        capability: CUDA compute capability ``(major, minor)`` of the device, None without CUDA.
        importable: the flash-attn flavours that import here, a subset of ``{"flash3", "flash2"}``.
    Returns:
        ``flash3`` on Hopper with flash-attn 3, ``flash2`` on Ampere / Ada with flash-attn 2,
        else ``sdpa`` (PyTorch then picks its flash / cuDNN / memory-efficient kernel).
    """
    if capability is None:
        return "sdpa"
    major = capability[0]
    if major == 9 and "flash3" in importable:
        return "flash3"
    if major == 8 and "flash2" in importable:
        return "flash2"
    return "sdpa"


def _device_facts() -> Tuple[Optional[Tuple[int, int]], Tuple[str, ...], str]:
    """(capability, importable flash flavours, device name) of the current CUDA device."""
    if not accelerator().is_available():
        return None, (), "no CUDA device"
    capability = accelerator().capability()
    importable = tuple(name for name in ("flash3", "flash2") if _flash_attn_func(name) is not None)
    return capability, importable, accelerator().device_name()


def resolve_backend(name: str = "auto") -> str:
    """Turn a backend request into a concrete backend name; raise for unknown or missing ones.

    ``auto`` is resolved with :func:`choose_backend` and the choice is logged at INFO.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        capability, importable, device = _device_facts()
        chosen = choose_backend(capability, importable)
        where = device if capability is None else f"{device}, sm_{capability[0]}{capability[1]}"
        logger.info("attention backend: %s (auto on %s; flash-attn importable: %s)", chosen, where,
                    ", ".join(importable) or "none")
        return chosen
    if name in FLASH_MODULES and _flash_attn_func(name) is None:
        raise RuntimeError(f"attention backend {name!r} requested but flash-attn is not importable: install "
                           f"{FLASH_INSTALL_HINT[name]}; or use --attention_backend sdpa")
    logger.info("attention backend: %s", name)
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

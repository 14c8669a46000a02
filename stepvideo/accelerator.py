"""Everything stepvideo asks of a GPU, in one place.

Every ``torch.cuda`` call of the package goes through :func:`accelerator` (a test checks that
no other module names ``torch.cuda``). :class:`CudaAccelerator` answers with the real
``torch.cuda``; ``benchmark/rehearse.py`` swaps in an object with the same methods that
describes fake CUDA devices (:func:`using`), so a rehearsal on a CPU-only host replaces this
one object instead of patching dozens of call sites.

What the package needs from a GPU:

* facts: :meth:`~CudaAccelerator.is_available`, ``device_count``, ``current_device``,
  ``total_memory``, ``capability``, ``device_name``, ``mem_get_info``;
* control: ``set_device``, ``synchronize``, ``empty_cache``, ``reset_peak_memory_stats`` /
  ``max_memory_allocated`` (measurements only);
* streaming copies: ``new_stream``, ``current_stream``, ``stream`` (context), ``new_event``,
  ``pin`` (page-locked host copy);
* the out-of-memory exception type and the process-group backend of a CUDA rank.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator, Optional, Tuple

import torch


class CudaAccelerator:
    """The real ``torch.cuda`` (every method is a one-line pass-through)."""

    # ---- facts ---------------------------------------------------------------------------
    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def total_memory(self, device) -> int:
        """Bytes of memory of ``device``."""
        return torch.cuda.get_device_properties(device).total_memory

    def capability(self, device=None) -> Tuple[int, int]:
        return tuple(torch.cuda.get_device_capability(device))

    def device_name(self, device=None) -> str:
        return torch.cuda.get_device_name(device)

    def mem_get_info(self, device) -> Tuple[int, int]:
        """``(free bytes, total bytes)`` of ``device``."""
        return torch.cuda.mem_get_info(device)

    # ---- control -------------------------------------------------------------------------
    def set_device(self, device) -> None:
        torch.cuda.set_device(device)

    def synchronize(self, device=None) -> None:
        torch.cuda.synchronize(device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak_memory_stats(self, device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def cached_free_bytes(self, device) -> int:
        """Bytes torch's caching allocator holds on ``device`` but does not use (reusable)."""
        return torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    def max_memory_allocated(self, device) -> int:
        return torch.cuda.max_memory_allocated(device)

    # ---- streaming copies ----------------------------------------------------------------
    def new_stream(self, device):
        return torch.cuda.Stream(device)

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def stream(self, stream):
        """Context manager: kernels and copies inside go to ``stream``."""
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of a host tensor (asynchronous host-to-device copies need it)."""
        return tensor.pin_memory()

    # ---- errors and process groups -------------------------------------------------------
    @property
    def out_of_memory_error(self) -> Optional[type]:
        return getattr(torch.cuda, "OutOfMemoryError", None)

    def process_group_backend(self) -> str:
        return "nccl"


_CURRENT = [CudaAccelerator()]


def free_device(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return the cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        accelerator().empty_cache()


def accelerator():
    """The object every GPU question goes to (:class:`CudaAccelerator` unless a rehearsal swapped it)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def using(replacement) -> Iterator[object]:
    """Answer every GPU question with ``replacement`` inside the block (rehearsals, tests)."""
    _CURRENT.append(replacement)
    try:
        yield replacement
    finally:
        _CURRENT.remove(replacement)

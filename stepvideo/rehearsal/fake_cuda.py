"""Fake CUDA devices for a rehearsal on a CPU-only host.

:class:`FakeCuda` has the methods of :class:`stepvideo.accelerator.CudaAccelerator` and describes
``device_count`` cards of ``total_bytes`` each (compute capability 9.0 by default). Streams and
events are inert; ``synchronize`` and ``Event.synchronize`` are reported to ``on_sync`` (a host
sync). Pinning returns the tensor itself (fake tensors have no host pages).

:class:`CudaTensorPython` answers the Python-level tensor calls that a CPU-only torch build cannot
run on a fake CUDA tensor: indexing (``t[0]``, ``t[:, None]``, ``t[idx] = v`` take a CUDA device
guard in C++, which raises "PyTorch is not linked with support for cuda devices") is answered
with the equivalent aten ops; ``param.data = t`` also moves the fake tensor's device (a
FakeTensor keeps it in Python, and the block streaming moves weights this way); ``numpy()`` of
a shape-only tensor gives zeros of its shape (so the real mp4 writer runs); ``record_stream`` on
an inert stream does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

from ..perf.memory_accounting import GIB


class _InertStream(torch.Stream):
    """A host ``torch.Stream`` (``record_stream`` only accepts streams) that waits for nothing."""

    def __new__(cls):
        return super().__new__(cls, device="cpu")

    def wait_stream(self, other) -> None:
        return None

    def wait_event(self, event) -> None:
        return None


class _Event:
    def __init__(self, on_sync: Callable[[str], None]):
        self._on_sync = on_sync

    def record(self, stream=None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._on_sync("Event.synchronize")


class FakeCuda:
    """``device_count`` fake CUDA cards of ``total_bytes``; see the module docstring."""

    name = "fake-cuda"

    def __init__(self, device_count: int, total_bytes: int, *, capability: Tuple[int, int] = (9, 0),
                 on_sync: Optional[Callable[[str], None]] = None,
                 used_bytes: Optional[Callable[[int], int]] = None):
        self._count = device_count
        self._total = int(total_bytes)
        self._capability = capability
        self._on_sync = on_sync or (lambda what: None)
        self._used = used_bytes or (lambda index: 0)
        self._current = 0
        self.set_devices = []                    # every set_device call (placement order)

    # ---- facts -----------------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self._count

    def current_device(self) -> int:
        return self._current

    def total_memory(self, device) -> int:
        return self._total

    def capability(self, device=None) -> Tuple[int, int]:
        return self._capability

    def device_name(self, device=None) -> str:
        return f"fake CUDA {self._total / GIB:.0f} GiB, sm_{self._capability[0]}{self._capability[1]}"

    def mem_get_info(self, device) -> Tuple[int, int]:
        index = torch.device(device).index or 0
        return max(0, self._total - self._used(index)), self._total

    # ---- control ---------------------------------------------------------------------------
    def set_device(self, device) -> None:
        self._current = torch.device(device).index or 0
        self.set_devices.append(str(device))

    def synchronize(self, device=None) -> None:
        self._on_sync("torch.cuda.synchronize")

    def empty_cache(self) -> None:
        return None

    def reset_peak_memory_stats(self, device) -> None:
        return None

    def cached_free_bytes(self, device) -> int:
        return 0                                  # the rehearsal's allocations are all live

    def max_memory_allocated(self, device) -> int:
        return self._used(torch.device(device).index or 0)

    # ---- streaming copies ------------------------------------------------------------------
    def new_stream(self, device):
        return _InertStream()

    def current_stream(self, device):
        return _InertStream()

    def stream(self, stream):
        return contextlib.nullcontext()

    def new_event(self):
        return _Event(self._on_sync)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def out_of_memory_error(self) -> Optional[type]:
        return getattr(torch, "OutOfMemoryError", None)

    def process_group_backend(self) -> str:
        return "fake"


# ---------------------------------------------------------------------------------------------
# Python-level tensor calls on fake CUDA tensors
# ---------------------------------------------------------------------------------------------
def _count_dims(index) -> int:
    """Dimensions of the indexed tensor that ``index`` (a tuple) consumes."""
    used = 0
    for i in index:
        if i is None or i is Ellipsis:
            continue
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            used += i.ndim
        else:
            used += 1
    return used


def _as_index_tensor(i, device) -> torch.Tensor:
    if isinstance(i, torch.Tensor):
        return i.to(device)
    return torch.tensor(i, device=device)


def _basic_view(t: torch.Tensor, index):
    """``t[index]`` with aten ops: returns ``(view, advanced)`` where ``advanced`` is the list for
    ``aten.index`` (None where a dimension is not indexed by a tensor), or None."""
    aten = torch.ops.aten
    if not isinstance(index, tuple):
        index = (index,)
    out, dim = t, 0
    advanced = []
    for i in index:
        if i is None:
            out = aten.unsqueeze.default(out, dim)
            advanced.append(None)
            dim += 1
        elif i is Ellipsis:
            skip = t.ndim - _count_dims(index)
            advanced.extend([None] * skip)
            dim += skip
        elif isinstance(i, bool):
            raise TypeError("boolean scalar indices are not supported in a rehearsal")
        elif isinstance(i, int) or (isinstance(i, torch.SymInt)):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            start = 0 if i.start is None else i.start
            stop = torch.iinfo(torch.int64).max if i.stop is None else i.stop
            out = aten.slice.Tensor(out, dim, start, stop, 1 if i.step is None else i.step)
            advanced.append(None)
            dim += 1
        else:                                    # tensor / list index: advanced indexing
            index_tensor = _as_index_tensor(i, out.device)
            width = index_tensor.ndim if index_tensor.dtype == torch.bool else 1
            advanced.append(index_tensor)
            advanced.extend([None] * (width - 1))
            dim += width
    if all(a is None for a in advanced):
        return out, None
    while advanced and advanced[-1] is None:
        advanced.pop()
    return out, advanced


def _getitem(t: torch.Tensor, index):
    view, advanced = _basic_view(t, index)
    return view if advanced is None else torch.ops.aten.index.Tensor(view, advanced)


def _setitem(t: torch.Tensor, index, value) -> None:
    view, advanced = _basic_view(t, index)
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=t.dtype, device=t.device)
    if advanced is None:
        torch.ops.aten.copy_.default(view, value.expand(view.shape) if value.ndim <= view.ndim else value)
    else:
        torch.ops.aten.index_put_.default(view, advanced, value.to(view.dtype))


_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_,
                 torch.float16: np.float16, torch.float64: np.float64}


def _cuda_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The kernel PyTorch's CUDA SDPA picks, as shape-only ops: flash attention for bf16 / fp16
    without a mask, the memory-efficient kernel with one (a boolean mask becomes an additive
    bias). A CPU-only build would otherwise fall back to the math path and its L x L scores.

    Every fused CUDA kernel needs the last dimension of q, k and v at stride 1 (or of size 1);
    otherwise CUDA runs the math path too, scores and all (the VAE's single-head attention on a
    transposed view is such a call), and so does this answer."""
    aten = torch.ops.aten
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        return aten._scaled_dot_product_attention_math.default(q, k, v, attn_mask, dropout_p, is_causal,
                                                               scale=scale, enable_gqa=enable_gqa)[0]
    if attn_mask is None and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and not enable_gqa:
        return aten._scaled_dot_product_flash_attention.default(q, k, v, dropout_p, is_causal, False,
                                                                scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
            aten.bitwise_not.default(bias), float("-inf"))
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return aten._scaled_dot_product_efficient_attention.default(q, k, v, bias, False, dropout_p, is_causal,
                                                                scale=scale)[0]


HOST_READS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")


class ValueNeeded(RuntimeError):
    """The code read a CUDA tensor's value on the host; a shape-only tensor has none."""


class CudaTensorPython(TorchFunctionMode):
    """Answers indexing, ``~``, ``numpy()`` and ``record_stream`` of fake tensors (see the module
    docstring). A host read of a CUDA tensor's value (``int(t)``, ``t.item()``, ``bool(t)``) is
    a host sync on a GPU; it goes to ``answer_read(what)``, which records it and returns the value
    to assume or raises :class:`ValueNeeded` (a rehearsal has no values)."""

    def __init__(self, answer_read: Optional[Callable[[str], object]] = None):
        super().__init__()
        self._answer = answer_read
        self._reentered = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda":
            if self._answer is not None and name != "tolist":
                value = self._answer(f"Tensor.{name}")
                return bool(value) if name == "__bool__" else float(value) if name == "__float__" else value
            raise ValueNeeded(f"Tensor.{name}() reads a CUDA tensor's value on the host (a host sync per call); "
                              "a rehearsal has no values: pass the number from where it is known instead")
        if name == "__set__" and getattr(getattr(func, "__self__", None), "__name__", "") == "data" \
                and _is_fake(args[0]) and _is_fake(args[1]):
            func(*args, **kwargs)                 # FakeTensor keeps its device in Python: carry it over
            args[0].fake_device = args[1].fake_device
            return None
        if name == "scaled_dot_product_attention" and args[0].device.type == "cuda":
            return _cuda_sdpa(*args, **kwargs)
        if name == "__invert__" and args[0].device.type == "cuda":
            return torch.ops.aten.bitwise_not.default(args[0])
        if name == "contiguous" and args[0].device.type == "cuda":
            fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
            if args[0].is_contiguous(memory_format=fmt):
                return args[0]
            return torch.ops.aten.clone.default(args[0], memory_format=fmt)
        if name == "__getitem__" and args[0].device.type == "cuda":
            return _getitem(args[0], args[1])
        if name == "__setitem__" and args[0].device.type == "cuda":
            return _setitem(args[0], args[1], args[2])
        if name == "record_stream":
            return None
        if name == "numpy" and _is_fake(args[0]):
            return np.zeros(tuple(args[0].shape), dtype=_NUMPY_DTYPES.get(args[0].dtype, np.float32))
        if func in self._reentered:                # a Python-level function run again with this mode on
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError as err:
            if "not linked with support for cuda" not in str(err):
                raise
        # the Python binding took a CUDA device guard: the aten op of the same name, or, for a
        # function written in Python (F.interpolate, ...), the same function with this mode on
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            return packet(*args, **kwargs)
        self._reentered.add(func)
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            self._reentered.discard(func)


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def module_to_in_place():
    """``nn.Module.to`` as it behaves on a GPU (``param.data = param.data.to(...)``).

    PyTorch swaps fake parameters instead (``torch.utils.swap_tensors``), which fails while
    FakeTensorMode holds weak references to them; a real CUDA run never swaps, so the rehearsal
    moves them in place the way the GPU run does."""
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        for sub in module.modules():
            for tensors in (sub._parameters, sub._buffers):
                for key, t in tensors.items():
                    if t is None:
                        continue
                    target = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else None
                    t.data = t.data.to(device=device, dtype=target, non_blocking=non_blocking)
        return module

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def cuda_generators_on_host():
    """``torch.Generator(device="cuda:N")`` needs the CUDA library; inside this block it gives a
    host generator instead (a shape-only ``randn`` draws nothing from it)."""
    original = torch.Generator

    class Generator(original):
        def __new__(cls, device="cpu"):
            if torch.device(device).type == "cuda":
                return original("cpu")
            return original(device)

    torch.Generator = Generator
    try:
        yield
    finally:
        torch.Generator = original

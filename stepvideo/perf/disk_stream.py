"""Disk streaming: DiT blocks read from the safetensors files as they are needed, not held in RAM.

For a host with less RAM than the streamed weights (``--stream_from_disk``, or ``--memory_profile
auto`` on a short host; :mod:`stepvideo.perf.host_memory` decides). :func:`load_dit_from_disk`
builds the DiT on the meta device, reads only the non-block weights (to the device) and leaves
every block tensor as a 0-element placeholder; :class:`DiskBlockSource` then gives
:class:`~stepvideo.perf.offload.BlockStreamer` one block's tensors at a time:

* each safetensors file is memory-mapped once (copy-on-write mapping, never written); a block's
  tensors are copied out of the mapping (into pinned memory when CUDA is available, so the
  host-to-device copy is asynchronous), converted to the model's dtype (fp8 blocks: quantised
  per output row as :func:`stepvideo.fp8_linear.quantize_weight` does), and the mapped pages are
  dropped again (``madvise(MADV_DONTNEED)``: the page cache keeps them, this process's RSS does not);
* the streamer reads two blocks ahead on a background thread, so at most
  :data:`~stepvideo.perf.host_memory.DISK_BLOCKS_IN_FLIGHT` blocks are in host memory (the one
  being read, the prefetched one, and on CPU the running one).

Every step reads each streamed block's bytes from the files once (``bytes_per_pass``); at NVMe
rates that is the step's floor when it is larger than the compute (bench_memory prints it, derived).
"""
from __future__ import annotations

import mmap
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..loading import checkpoint as ckpt
from ..accelerator import accelerator
from ..fp8_linear import FP8Linear, quantize_blocks, quantize_weight
from ..models.dit import StepVideoModel
from .offload import named_block_tensors

_PAGE = mmap.PAGESIZE


class MappedSafetensors:
    """Zero-copy CPU views of the tensors of safetensors ``files`` (each mapped once)."""

    def __init__(self, files: Sequence[Path]):
        self.entries: Dict[str, Tuple[int, torch.dtype, list, int, int]] = {}    # key -> (file, dtype, shape, start, end)
        self.maps: List[mmap.mmap] = []
        for f in files:
            header = ckpt.check_safetensors_file(f)
            with open(f, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                self.maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY))
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[key] = (len(self.maps) - 1, ckpt.SAFETENSORS_DTYPES[info["dtype"]], info["shape"], base + start,
                                     base + end)

    def view(self, key: str) -> torch.Tensor:
        index, dtype, shape, start, end = self.entries[key]
        raw = torch.frombuffer(self.maps[index], dtype=torch.uint8, count=end - start, offset=start)
        return raw.view(dtype).reshape(shape)

    def drop(self, key: str) -> None:
        """Unmap this tensor's pages from the process (they stay in the page cache)."""
        index, _, _, start, end = self.entries[key]
        first = start - start % _PAGE
        length = end - first
        if length > 0 and hasattr(mmap, "MADV_DONTNEED"):
            self.maps[index].madvise(mmap.MADV_DONTNEED, first, length)

    def nbytes(self, key: str) -> int:
        _, _, _, start, end = self.entries[key]
        return end - start


class DiskBlockSource:
    """Reads block ``i`` (keys ``f"{prefixes[i]}{name}"``) from the mapped files into host tensors
    of the block's own dtypes, in the order the streamer assigns them."""

    def __init__(self, mapped: MappedSafetensors, blocks: Sequence[nn.Module], prefixes: Sequence[str],
                 pin_memory: bool = False):
        self.mapped = mapped
        self.prefixes = list(prefixes)
        self.layout = [[(name, t.dtype) for name, t in named_block_tensors(b)] for b in blocks]
        self.fp8 = [{name for name, m in b.named_modules() if isinstance(m, FP8Linear)} for b in blocks]
        self.pin_memory = pin_memory
        self.bytes_read = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-blocks")

    def _copy(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        view = self.mapped.view(key)
        out = torch.empty(view.shape, dtype=dtype, pin_memory=self.pin_memory)
        out.copy_(view)
        self.mapped.drop(key)
        self.bytes_read += self.mapped.nbytes(key)
        return out

    def _quantise(self, key: str, rows: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp8 weight and per-row scales of a stored bf16 / fp32 weight, ``rows`` rows at a time
        (each row's scale is its own: the same numbers as one :func:`quantize_weight` call, with
        fp32 temporaries of ``rows`` rows instead of two of the whole weight)."""
        view = self.mapped.view(key)
        q = torch.empty(view.shape, dtype=torch.float8_e4m3fn, pin_memory=self.pin_memory)
        scale = torch.empty(view.shape[0], dtype=torch.float32, pin_memory=self.pin_memory)
        for start in range(0, view.shape[0], rows):
            q[start:start + rows], scale[start:start + rows] = quantize_weight(view[start:start + rows])
        self.mapped.drop(key)
        self.bytes_read += self.mapped.nbytes(key)
        return q, scale

    def read(self, index: int) -> List[torch.Tensor]:
        prefix, quantised = self.prefixes[index], self.fp8[index]
        out: Dict[str, torch.Tensor] = {}
        for name, dtype in self.layout[index]:
            module, _, attr = name.rpartition(".")
            if module in quantised and attr in ("weight", "weight_scale"):
                if f"{module}.weight" not in out:                  # a bf16 file: quantise as fp8.quantize_blocks does
                    key = f"{prefix}{module}.weight"
                    if self.mapped.entries[key][1] == torch.float8_e4m3fn:
                        out[f"{module}.weight"] = self._copy(key, dtype)
                        out[f"{module}.weight_scale"] = self._copy(f"{prefix}{module}.weight_scale", torch.float32)
                    else:
                        out[f"{module}.weight"], out[f"{module}.weight_scale"] = self._quantise(key)
                continue
            out[name] = self._copy(prefix + name, dtype)
        return [out[name] for name, _ in self.layout[index]]     # pinned already when pin_memory

    def submit(self, index: int) -> "Future[List[torch.Tensor]]":
        return self._pool.submit(self.read, index)

    def bytes_per_pass(self) -> int:
        """File bytes one pass over every block reads."""
        total = 0
        for index, prefix in enumerate(self.prefixes):
            total += sum(self.mapped.nbytes(k) for k in self.mapped.entries if k.startswith(prefix))
        return total


def load_dit_from_disk(transformer_dir, *, torch_dtype=torch.bfloat16, device="cpu", fp8: bool = False,
                       attention_backend: str = "auto"):
    """``StepVideoModel`` with its non-block weights on ``device`` and the blocks left on disk:
    returns ``(model, source)``; pass ``source`` to ``enable_block_offload(..., source=source)``."""
    folder, config, files = StepVideoModel.locate_checkpoint(transformer_dir)
    dtype = ckpt.parse_dtype(torch_dtype)
    with torch.device("meta"):
        model = StepVideoModel.from_config(config, attention_backend=attention_backend)
    if fp8:
        quantize_blocks(model)                                  # meta: shapes and dtypes only
    mapped = MappedSafetensors(files)
    # copies (never views of the mapping): the non-block weights are held like any loaded weight
    outside = ((key, mapped.view(key).clone()) for key in mapped.entries if not key.startswith("transformer_blocks."))
    ckpt.load_state_into_model(model, outside, dtype=dtype, device=device, strict=False, where=str(folder))
    for key in mapped.entries:
        if not key.startswith("transformer_blocks."):
            mapped.drop(key)
    for block in model.transformer_blocks:                    # placeholders until the streamer loads a block
        for name, t in named_block_tensors(block):
            module, _, attr = name.rpartition(".")
            owner = block.get_submodule(module) if module else block
            keep = isinstance(owner, FP8Linear) and attr in ("weight", "weight_scale")
            placeholder = torch.empty(0, dtype=t.dtype if keep or not t.is_floating_point() else dtype, device="cpu")
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(placeholder, requires_grad=False)
            else:
                owner._buffers[attr] = placeholder
    ckpt.assert_materialized(model, f"StepVideoModel (disk-streamed blocks) from {folder}")
    prefixes = [f"transformer_blocks.{i}." for i in range(len(model.transformer_blocks))]
    source = DiskBlockSource(mapped, list(model.transformer_blocks), prefixes,
                             pin_memory=accelerator().is_available())
    return model.eval().requires_grad_(False), source

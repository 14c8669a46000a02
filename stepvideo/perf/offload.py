"""Block-wise offload for GPUs that cannot hold every block: stream blocks from host memory,
prefetching the next one on a side stream while the current one computes.

``enable_block_offload(model, device)`` puts everything outside the block list on ``device``
and keeps the streamed blocks' tensors on the host (pinned when CUDA is available). A forward
pre-hook makes sure a block's weights are on the device before it runs and starts copying the
NEXT streamed block (wrapping around to the first one for the next forward); a forward hook
drops the device copies right after the block. At most two streamed blocks (the running one and
the prefetched one) are on the device at any time.

* ``blocks``: the ``nn.ModuleList`` to stream (default ``model.transformer_blocks``; the Step-LLM
  passes ``model.transformer.layers``).
* ``resident``: the first ``resident`` blocks stay on the device for good (partial offload:
  stream only what does not fit).
* ``source``: a :class:`~stepvideo.perf.disk_stream.DiskBlockSource`: the blocks are not held on
  the host at all but read from the checkpoint files two blocks ahead (``--stream_from_disk``).
* On CUDA the copies run on a side stream (``accelerator().new_stream``) from pinned memory and the
  compute stream waits on an event per block; the device copies are marked with
  ``record_stream`` so the caching allocator never reuses them while a kernel still reads them.
  Elsewhere (``device='cpu'``, the path the CPU tests run) the same bookkeeping runs with plain
  synchronous copies.

The weights are never modified, so outputs equal those of the fully resident model.
``disable_block_offload`` undoes it. ``streamed_bytes(model)`` is what one forward moves.

Cost: every forward copies each streamed block once: 1.125 GiB per bf16 DiT block, 0.56 GiB
per fp8 block (see docs/performance.md for the per-profile totals and PCIe times).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..accelerator import accelerator


def named_block_tensors(block: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a block in the streamer's order: parameters, then buffers."""
    return list(block.named_parameters(recurse=True)) + list(block.named_buffers(recurse=True))


def _tensors(block: nn.Module) -> List[torch.Tensor]:
    return [t for _, t in named_block_tensors(block)]


class BlockStreamer:
    """Holds the host copies of the streamed blocks and moves them to ``device`` on demand.

    With a ``source`` (:class:`~stepvideo.perf.disk_stream.DiskBlockSource`) nothing is held: a
    block's host tensors are read from disk on a background thread two blocks ahead, and the
    block's tensors point at 0-element placeholders while it is not loaded."""

    def __init__(self, blocks: List[nn.Module], device: torch.device, pin_memory: bool, source=None):
        self.blocks = blocks
        self.device = device
        self.tensors = [_tensors(b) for b in blocks]
        self.source = source
        self._reads: Dict[int, object] = {}          # disk: index -> Future of its host tensors
        self.host: List[List[torch.Tensor]] = []
        for tensors in self.tensors:
            if source is not None:                   # the placeholders stand in for the host copies
                self.host.append([t.data for t in tensors])
                continue
            copies = []
            for t in tensors:
                cpu = t.data.to("cpu")
                if pin_memory:
                    cpu = accelerator().pin(cpu)
                t.data = cpu
                copies.append(cpu)
            self.host.append(copies)
        self.use_streams = self.device.type == "cuda" and accelerator().is_available()
        self.side_stream = accelerator().new_stream(self.device) if self.use_streams else None
        self._loaded: Dict[int, tuple] = {}          # index -> (device copies, ready event or None)
        self.loads = 0                               # blocks copied so far (tests, benchmarks)

    def _host_tensors(self, index: int) -> List[torch.Tensor]:
        if self.source is None:
            return self.host[index]
        future = self._reads.pop(index, None)
        return future.result() if future is not None else self.source.read(index)

    def _read_ahead(self, index: int) -> None:
        """Disk: start reading block ``index`` on the background thread (if not loaded or queued)."""
        if self.source is not None and index not in self._loaded and index not in self._reads:
            self._reads[index] = self.source.submit(index)

    def _load(self, index: int) -> None:
        if index in self._loaded:
            return
        host = self._host_tensors(index)
        if self.use_streams:
            self.side_stream.wait_stream(accelerator().current_stream(self.device))
            with accelerator().stream(self.side_stream):
                copies = [cpu.to(self.device, non_blocking=True) for cpu in host]
                event = accelerator().new_event()
                event.record(self.side_stream)
        else:
            copies = [cpu.to(self.device) for cpu in host]
            event = None
        # disk: the pinned host tensors stay referenced until the block is released (async copy)
        self._loaded[index] = (copies, event, host if self.source is not None else None)
        self.loads += 1

    def activate(self, index: int) -> None:
        """Block ``index`` is about to run: its weights on the device, then prefetch the next."""
        self._load(index)
        copies, event, _ = self._loaded[index]
        if event is not None:
            stream = accelerator().current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)
        for t, c in zip(self.tensors[index], copies):
            t.data = c
        self._load((index + 1) % len(self.blocks))          # overlaps with this block's compute
        self._read_ahead((index + 2) % len(self.blocks))    # disk: read two ahead

    def release(self, index: int) -> None:
        """Block ``index`` finished: point its tensors back at the host copies, drop the device ones."""
        for t, cpu in zip(self.tensors[index], self.host[index]):
            t.data = cpu
        self._loaded.pop(index, None)

    def release_all(self) -> None:
        """Drop every device copy, the prefetched one included (the model leaves the device)."""
        for index in list(self._loaded):
            self.release(index)
        for future in self._reads.values():
            future.result()
        self._reads.clear()

    def device_blocks(self) -> int:
        return len(self._loaded)


def streamed_bytes(model: nn.Module) -> int:
    """Bytes one forward copies to the device (0 without offload)."""
    streamer = getattr(model, "_block_streamer", None)
    if streamer is None:
        return 0
    if streamer.source is not None:
        return streamer.source.bytes_per_pass()
    return sum(t.numel() * t.element_size() for copies in streamer.host for t in copies)


def enable_block_offload(model: nn.Module, device, pin_memory: Optional[bool] = None, *,
                         blocks: Optional[nn.ModuleList] = None, resident: int = 0, source=None) -> nn.Module:
    """Stream ``blocks[resident:]`` from host memory (from disk with a ``source``, which then
    covers every block: ``resident`` must be 0); everything else goes to ``device``."""
    if source is not None and resident:
        raise ValueError("disk streaming streams every block (resident must be 0)")
    device = torch.device(device)
    if pin_memory is None:
        pin_memory = accelerator().is_available()
    blocks = model.transformer_blocks if blocks is None else blocks
    if not 0 <= resident <= len(blocks):
        raise ValueError(f"resident blocks must be in [0, {len(blocks)}], got {resident}")
    streamed = list(blocks)[resident:]
    streamed_ids = {id(b) for b in streamed}
    for b in list(blocks)[:resident]:
        b.to(device)
    _move_except(model, device, streamed_ids)
    handles: List = []
    if streamed:
        streamer = BlockStreamer(streamed, device, pin_memory, source=source)
        for index, block in enumerate(streamed):
            handles.append(block.register_forward_pre_hook(
                lambda module, args, index=index: streamer.activate(index)))
            handles.append(block.register_forward_hook(
                lambda module, args, output, index=index: (streamer.release(index), output)[1]))
        model._block_streamer = streamer
    model._offload_handles = handles
    return model


def _move_except(module: nn.Module, device: torch.device, skip: set) -> None:
    """Move every parameter / buffer of ``module`` to ``device`` except inside the ``skip`` modules."""
    if id(module) in skip:
        return
    for name, p in list(module.named_parameters(recurse=False)):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        b.data = b.data.to(device)
    for child in module.children():
        _move_except(child, device, skip)


def disable_block_offload(model: nn.Module, device) -> nn.Module:
    for h in getattr(model, "_offload_handles", []):
        h.remove()
    model._offload_handles = []
    model._block_streamer = None
    return model.to(device)

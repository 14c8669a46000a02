"""Block-wise CPU offload of the DiT for GPUs that cannot hold all 48 blocks.

``enable_block_offload(model, device)`` puts everything outside ``model.transformer_blocks`` on
``device`` and keeps each block's parameters on the CPU (pinned when CUDA is available). A
forward pre-hook copies a block's tensors to ``device`` just before it runs (non-blocking from
pinned memory) and a forward hook drops the device copies right after, so at most one block's
weights (about 1.2 GB in bf16 for the real model) are resident at a time. The weights are
never modified, so outputs equal those of the fully resident model. ``device='cpu'`` is the
no-op-equivalent path the CPU tests exercise. ``disable_block_offload`` undoes it.

Cost: every step streams all block weights over PCIe (~55 GiB in bf16, ~2 s at 25 GB/s per
step), small next to a ~30+ s step at 75k tokens.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def _tensors(block: nn.Module):
    yield from block.named_parameters(recurse=True)
    yield from block.named_buffers(recurse=True)


def enable_block_offload(model: nn.Module, device, pin_memory: bool | None = None) -> nn.Module:
    device = torch.device(device)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    blocks = model.transformer_blocks
    for name, child in model.named_children():
        if name != "transformer_blocks":
            child.to(device)
    for name, p in list(model.named_parameters(recurse=False)):
        p.data = p.data.to(device)
    handles: List = []
    for block in blocks:
        tensors = [t for _, t in _tensors(block)]
        host = []                                   # the CPU (pinned) copies, kept for the run
        for t in tensors:
            cpu = t.data.to("cpu")
            if pin_memory:
                cpu = cpu.pin_memory()
            t.data = cpu
            host.append(cpu)

        def pre_hook(module, args, tensors=tensors, host=host):
            for t, cpu in zip(tensors, host):
                t.data = cpu.to(device, non_blocking=True)

        def post_hook(module, args, output, tensors=tensors, host=host):
            for t, cpu in zip(tensors, host):
                t.data = cpu                        # drop the device copy; weights never change
            return output

        handles.append(block.register_forward_pre_hook(pre_hook))
        handles.append(block.register_forward_hook(post_hook))
    model._offload_handles = handles
    return model


def disable_block_offload(model: nn.Module, device) -> nn.Module:
    for h in getattr(model, "_offload_handles", []):
        h.remove()
    model._offload_handles = []
    return model.to(device)

"""Optional compiled block path: ``torch.compile`` each DiT block in place.

``compile_blocks(model)`` calls ``nn.Module.compile`` on every ``transformer_blocks[i]``: the
state-dict keys, the sequence-parallel hook calls and the eager code are unchanged; Inductor
fuses the element-wise stages (``qk_norm_rope``, ``modulate``, ``gated_residual``, GELU,
LayerNorm) around the matmul / attention kernels. All blocks share one compiled graph (same
code, same shapes), so compilation happens once. ``dynamic=False`` by default: one grid size
per process, as in generation.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = False,
                   fullgraph: bool = False) -> nn.Module:
    for block in model.transformer_blocks:
        block.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    return model

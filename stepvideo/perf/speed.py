"""``apply_speed_options``: the one place the DiT's speed options are applied, in their one order.

fp8 block linears (:mod:`stepvideo.fp8_linear`) -> ``prepare(dit)`` (the memory profile's
placement, when there is one) -> block offload (:mod:`stepvideo.perf.offload`) -> torch.compile
of every block (:mod:`stepvideo.perf.compile`). Used by the generator, the lossless check and
``benchmark/bench_dit.py``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .compile import compile_blocks
from ..fp8_linear import quantize_blocks
from .offload import enable_block_offload


def apply_speed_options(dit, device, *, fp8: bool = False, offload: bool = False, compile: bool = False,
                        prepare: Optional[Callable[[torch.nn.Module], None]] = None):
    """Apply the chosen options to ``dit`` (a ``StepVideoModel``, not a CFG wrapper) in place;
    ``offload`` streams its blocks to ``device``. Returns ``dit``."""
    if fp8:
        quantize_blocks(dit)
    if prepare is not None:
        prepare(dit)
    if offload:
        enable_block_offload(dit, torch.device(device))
    if compile:
        compile_blocks(dit)
    return dit

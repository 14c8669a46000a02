"""Classifier-free-guidance parallelism: the CFG batch split over two rank groups.

The pipeline calls the DiT on a batch ``[cond, uncond]``. With a CFG group of size 2, CFG
rank 0 runs the conditional half and CFG rank 1 the unconditional half; an all-gather over
the CFG group rebuilds the full batch on every rank, so the pipeline (guidance, scheduler)
is unchanged and every rank holds identical latents.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

# forward arguments whose dim 0 is the batch (split over the CFG group when it matches B)
BATCHED_ARGUMENTS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_2", "timestep",
                     "encoder_attention_mask", "condition_hidden_states", "motion_score", "fps")


class CFGParallelModel(nn.Module):
    """Wrap a DiT so that each CFG rank computes its share of the batch.

    ``forward`` takes exactly the arguments of the wrapped model and returns the same
    full-batch result (a ``{"x": out}`` dict or the tensor, as the model does) on every rank;
    other attributes are read through to the wrapped model.
    The batch size must be divisible by the CFG group size; per-row tensors (``timestep
    [B]``, masks, latents, text) are split, scalars and broadcast values are passed unchanged.
    """

    def __init__(self, model: nn.Module, group: Optional["dist.ProcessGroup"]):
        super().__init__()
        self.module = model
        self.group = group
        self.cfg_size = dist.get_world_size(group)
        self.cfg_rank = dist.get_rank(group)
        self._signature = inspect.signature(model.forward)

    def __getattr__(self, name: str):
        """Other attributes (``dtype``, ``device``, ``config``, ``in_channels``, ...) are the model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        batch = bound.arguments["hidden_states"].shape[0]
        if batch % self.cfg_size:
            raise ValueError(f"CFG parallelism over {self.cfg_size} ranks needs a batch divisible by "
                             f"{self.cfg_size} ([cond, uncond]), got hidden_states with batch {batch}")
        for name in BATCHED_ARGUMENTS:
            value = bound.arguments.get(name)
            if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch and batch > 1:
                bound.arguments[name] = value.chunk(self.cfg_size, dim=0)[self.cfg_rank]
        out = self.module(*bound.args, **bound.kwargs)
        if isinstance(out, dict):
            return {**out, "x": self._gather(out["x"])}
        return self._gather(out)

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        """``[B/cfg, ...]`` on every CFG rank -> ``[B, ...]`` in CFG-rank order."""
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(self.cfg_size)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, dim=0)

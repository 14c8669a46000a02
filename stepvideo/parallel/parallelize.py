"""From a :class:`ParallelState` to a DiT ready to run on this rank.

Typical worker (every rank, under torchrun)::

    config = ParallelConfig(ulysses_degree=U, tensor_parallel_degree=T, cfg_parallel=C)
    validate_before_loading(config, num_heads, read_env().world_size, token_count=F * h * w)
    state = ParallelState.from_env(config)
    dit = load_parallel_dit(model_dir, state, torch_dtype=torch.bfloat16)
    out = dit(hidden_states=..., ...)      # same call and same full result as StepVideoModel
    state.barrier(); save on state.is_main; state.destroy()

Order of application: tensor parallelism (weights), then sequence-parallel hooks (installed
with ``model.set_sequence_parallel``), then the CFG wrapper. The DiT forward is never copied
or patched.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from ..models.dit import StepVideoModel
from ..models.parallel_hooks import LocalSequence
from .cfg import CFGParallelModel
from .state import ParallelState
from .tensor import apply_tensor_parallel, load_tensor_parallel_dit
from .ulysses import UlyssesSequence


def sequence_hooks(state: ParallelState):
    """The sequence-parallel hooks for ``state``: ``LocalSequence`` at SP degree 1, else the
    native Ulysses hooks or (``config.sp_backend == 'xfuser'``) the xfuser adaptor."""

    if state.config.sp_degree == 1:
        return LocalSequence()
    if state.config.sp_backend == "xfuser":
        from .xfuser_backend import XFuserSequence      # imported only when chosen
        return XFuserSequence(state)
    return UlyssesSequence(state.sp_group)


def parallelize_dit(model: nn.Module, state: ParallelState, *, shard_weights: bool = True) -> nn.Module:
    """Apply TP (unless the weights are already sharded), install SP hooks, wrap for CFG.

    Returns the model itself when no CFG split is needed, else a :class:`CFGParallelModel`;
    either is called exactly like ``StepVideoModel`` and returns the full batch on every rank.
    """
    if shard_weights and state.config.tp_degree > 1 and getattr(model, "tensor_parallel_degree", 1) == 1:
        apply_tensor_parallel(model, state.tp_group)
    model.set_sequence_parallel(sequence_hooks(state))
    if state.config.cfg_degree > 1:
        return CFGParallelModel(model, state.cfg_group)
    return model


def load_parallel_dit(pretrained_model_name_or_path: Union[str, os.PathLike], state: ParallelState, *,
                      torch_dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                      device: Optional[Union[str, torch.device]] = None, **overrides) -> nn.Module:
    """Load the DiT for this rank (only its TP shard is materialised) and parallelize it."""
    device = state.device if device is None else device
    if state.config.tp_degree > 1:
        model = load_tensor_parallel_dit(pretrained_model_name_or_path, state.tp_group, torch_dtype=torch_dtype,
                                         device=device, **overrides)
    else:
        model = StepVideoModel.from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype,
                                               device=device, **overrides)
    return parallelize_dit(model, state, shard_weights=False)

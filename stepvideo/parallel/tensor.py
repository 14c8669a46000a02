"""Tensor parallelism of the DiT blocks (spec 3.12), applied beside the model.

In every ``transformer_blocks.{i}``:

============================  =================  ===========================================
module                        kind               this rank keeps
============================  =================  ===========================================
``attn1.wqkv``                column-parallel    row chunk r: whole heads with their q, k, v
                                                 (the rows are interleaved per head)
``attn2.wq``, ``attn2.wkv``   column-parallel    row chunk r: the same whole heads
``ff.net.0.proj``             column-parallel    row chunk r of the 4D hidden units
``attn1.wo``, ``attn2.wo``,   row-parallel       column chunk r; the partial outputs are
``ff.net.2``                                     summed over the TP group (all-reduce)
============================  =================  ===========================================

The blocks read their head count from the weight shapes, so the unchanged forward runs on
the shards. State-dict keys do not change (``RowParallelLinear`` is an ``nn.Linear``).

Memory: :func:`apply_tensor_parallel` on a loaded model frees the dropped rows/columns, but
the full model exists first. To materialise only the shard, build on ``meta``, apply, then
stream the checkpoint through :func:`shard_tensors` (:func:`load_tensor_parallel_dit`):
peak host memory is then this rank's model plus one full tensor.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

COLUMN_PARALLEL = ("attn1.wqkv", "attn2.wq", "attn2.wkv", "ff.net.0.proj")
ROW_PARALLEL = ("attn1.wo", "attn2.wo", "ff.net.2")
BLOCKS_PREFIX = "transformer_blocks"

_KEY = re.compile(rf"^{BLOCKS_PREFIX}\.\d+\.(?P<module>.+)\.(?P<param>weight|bias)$")


class RowParallelLinear(nn.Linear):
    """A Linear that holds a column shard of the weight and sums partial outputs over ``group``.

    ``x [..., in/tp]`` -> ``x W_r^T`` -> all-reduce(sum) -> ``+ bias`` -> ``[..., out]``. The
    bias (kept whole) is added once, after the sum. Inference only (the all-reduce is in place).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group: Optional["dist.ProcessGroup"] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + ", all-reduce over the TP group"


def shard_tensor(key: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor (unchanged for non-TP keys).

    Column-parallel weights and biases keep row chunk ``tp_rank``; row-parallel weights keep
    column chunk ``tp_rank``; row-parallel biases stay whole.
    """
    match = _KEY.match(key)
    if tp_size == 1 or match is None:
        return tensor
    module, param = match.group("module"), match.group("param")
    if module in COLUMN_PARALLEL:
        dim = 0
    elif module in ROW_PARALLEL and param == "weight":
        dim = 1
    else:
        return tensor
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{key}: dimension {dim} of shape {tuple(tensor.shape)} is not divisible by "
                         f"tensor_parallel_degree {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].clone()


def shard_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], tp_rank: int,
                  tp_size: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream ``(key, full tensor)`` -> ``(key, shard)`` for ``checkpoint.load_state_into_model``."""
    for key, tensor in tensors:
        yield key, shard_tensor(key, tensor, tp_rank, tp_size)


def _group_rank_size(group) -> Tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, group: Optional["dist.ProcessGroup"], *,
                          tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> nn.Module:
    """Shard every block of a ``StepVideoModel`` in place over the TP ``group``; returns the model.

    Works on loaded weights (dropped parts are freed) and on a ``meta`` model (only the
    shapes change; load the shards afterwards with :func:`shard_tensors`). ``tp_rank`` and
    ``tp_size`` default to the group's; a group of size 1 leaves the model untouched.
    """
    rank, size = _group_rank_size(group)
    tp_rank = rank if tp_rank is None else tp_rank
    tp_size = size if tp_size is None else tp_size
    if tp_size == 1:
        return model
    if getattr(model, "tensor_parallel_degree", 1) != 1:
        raise RuntimeError(f"the model is already tensor-parallel (degree {model.tensor_parallel_degree})")
    heads = model.num_attention_heads
    if heads % tp_size:
        raise ValueError(f"num_attention_heads ({heads}) must be divisible by tensor_parallel_degree ({tp_size})")

    def shard_param(p: torch.Tensor, key: str) -> nn.Parameter:
        return nn.Parameter(shard_tensor(key, p.data, tp_rank, tp_size), requires_grad=False)

    for index, block in enumerate(getattr(model, BLOCKS_PREFIX)):
        prefix = f"{BLOCKS_PREFIX}.{index}."
        for name in COLUMN_PARALLEL:
            linear = block.get_submodule(name)
            linear.weight = shard_param(linear.weight, prefix + name + ".weight")
            if linear.bias is not None:
                linear.bias = shard_param(linear.bias, prefix + name + ".bias")
            linear.out_features = linear.weight.shape[0]
        for name in ROW_PARALLEL:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child)
            weight = shard_param(linear.weight, prefix + name + ".weight")
            with torch.device("meta"):
                row = RowParallelLinear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, group=group)
            row.weight = weight
            if linear.bias is not None:
                row.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, child, row)
    model.tensor_parallel_degree = tp_size
    return model


def load_tensor_parallel_dit(pretrained_model_name_or_path: Union[str, os.PathLike],
                             group: Optional["dist.ProcessGroup"], *,
                             torch_dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                             device: Union[str, torch.device] = "cpu", **overrides) -> nn.Module:
    """``StepVideoModel.from_pretrained`` that materialises only this rank's TP shard.

    The model is built on ``meta``, sharded with :func:`apply_tensor_parallel`, and every
    checkpoint tensor is cut by :func:`shard_tensor` before it is cast and moved to ``device``.
    """
    from ..loading import checkpoint as ckpt
    from ..models.dit import StepVideoModel

    folder, config, files = StepVideoModel.locate_checkpoint(pretrained_model_name_or_path)
    dtype = ckpt.parse_dtype(torch_dtype) if torch_dtype is not None else None
    with torch.device("meta"):
        model = StepVideoModel.from_config(config, **overrides)
    rank, size = _group_rank_size(group)
    apply_tensor_parallel(model, group, tp_rank=rank, tp_size=size)

    def tensors():
        for f in files:
            yield from ckpt.iter_safetensors(f)

    ckpt.load_state_into_model(model, shard_tensors(tensors(), rank, size), dtype=dtype, device=device,
                               strict=True, where=str(folder))
    ckpt.assert_materialized(model, f"StepVideoModel (TP rank {rank}/{size}) from {folder}")
    return model.eval().requires_grad_(False)

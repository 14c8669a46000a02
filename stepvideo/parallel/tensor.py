"""Tensor parallelism of the DiT blocks (``../shared/spec/STEP_VIDEO_SPEC.md`` §3.12), applied
beside the model.

Which linears are split is a fact of the model, declared on its class as ``_tp_plan`` (see
``StepVideoModel._tp_plan``): module-name patterns (``*`` = a block index) mapped to

* ``"colwise"`` (column-parallel): this rank keeps row chunk r of the weight (and bias): whole
  heads with their q, k, v (the rows of ``attn1.wqkv`` are interleaved per head), or chunk r
  of the FFN hidden units;
* ``"rowwise"`` (row-parallel): this rank keeps column chunk r of the weight; the partial
  outputs are summed over the TP group (all-reduce) and the whole bias is added once.

This module only reads the plan. The blocks read their head count from the weight shapes, so
the unchanged forward runs on the shards. State-dict keys do not change
(``RowParallelLinear`` is an ``nn.Linear``).

Memory: :func:`apply_tensor_parallel` on a loaded model frees the dropped rows/columns, but
the full model exists first. To materialise only the shard, build on ``meta``, apply, then
stream the checkpoint through :func:`shard_tensors` (:func:`load_tensor_parallel_dit`):
peak host memory is then this rank's model plus one full tensor.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..loading import checkpoint as ckpt
from ..loading import fp8_checkpoint
from ..models.dit import StepVideoModel

PLAN_STYLES = ("colwise", "rowwise")


class TensorParallelPlan:
    """A model class's ``_tp_plan`` compiled for matching module names and checkpoint keys."""

    def __init__(self, plan: Mapping[str, str]):
        if not plan:
            raise ValueError("empty tensor-parallel plan: this model declares no _tp_plan")
        bad = {k: v for k, v in plan.items() if v not in PLAN_STYLES}
        if bad:
            raise ValueError(f"tensor-parallel plan styles must be one of {PLAN_STYLES}, got {bad}")
        self.plan = dict(plan)
        self._patterns = [(re.compile("^" + re.escape(name).replace(r"\*", r"\d+") + "$"), style)
                          for name, style in plan.items()]

    @classmethod
    def of(cls, model_or_class) -> "TensorParallelPlan":
        plan = getattr(model_or_class, "_tp_plan", None)
        if plan is None:
            name = getattr(model_or_class, "__name__", type(model_or_class).__name__)
            raise ValueError(f"{name} declares no _tp_plan: it cannot be made tensor-parallel")
        return cls(plan)

    def style(self, module_name: str) -> Optional[str]:
        """``"colwise"``, ``"rowwise"`` or None for a module name such as ``transformer_blocks.3.attn1.wo``."""
        for pattern, style in self._patterns:
            if pattern.match(module_name):
                return style
        return None

    def split_dim(self, key: str) -> Optional[int]:
        """The dimension a checkpoint tensor ``key`` is chunked along, or None if it stays whole."""
        module, _, param = key.rpartition(".")
        style = self.style(module)
        if style == "colwise" and param in ("weight", "bias"):
            return 0
        if style == "rowwise" and param == "weight":
            return 1
        return None


def default_plan() -> TensorParallelPlan:
    """The plan of ``StepVideoModel`` (what :func:`shard_tensor` uses when given none)."""

    return TensorParallelPlan.of(StepVideoModel)


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


def shard_tensor(key: str, tensor: torch.Tensor, tp_rank: int, tp_size: int,
                 plan: Optional[TensorParallelPlan] = None) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor (unchanged for keys outside the plan).

    Column-parallel weights and biases keep row chunk ``tp_rank``; row-parallel weights keep
    column chunk ``tp_rank``; row-parallel biases stay whole. ``plan`` defaults to
    ``StepVideoModel``'s.
    """
    if tp_size == 1:
        return tensor
    dim = (plan or default_plan()).split_dim(key)
    if dim is None:
        return tensor
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{key}: dimension {dim} of shape {tuple(tensor.shape)} is not divisible by "
                         f"tensor_parallel_degree {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].clone()


def shard_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], tp_rank: int, tp_size: int,
                  plan: Optional[TensorParallelPlan] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream ``(key, full tensor)`` -> ``(key, shard)`` for ``checkpoint.load_state_into_model``."""
    plan = plan or default_plan()
    for key, tensor in tensors:
        yield key, shard_tensor(key, tensor, tp_rank, tp_size, plan)


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

    plan = TensorParallelPlan.of(model)

    def shard_param(p: torch.Tensor, key: str) -> nn.Parameter:
        return nn.Parameter(shard_tensor(key, p.data, tp_rank, tp_size, plan), requires_grad=False)

    targets = [(name, module) for name, module in model.named_modules() if plan.style(name) is not None]
    if not targets:
        raise ValueError(f"the tensor-parallel plan of {type(model).__name__} matches no module: "
                         f"{sorted(plan.plan)}")
    for name, linear in targets:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"tensor-parallel plan entry {name} is a {type(linear).__name__}, not an nn.Linear")
        if plan.style(name) == "colwise":
            linear.weight = shard_param(linear.weight, name + ".weight")
            if linear.bias is not None:
                linear.bias = shard_param(linear.bias, name + ".bias")
            linear.out_features = linear.weight.shape[0]
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = shard_param(linear.weight, name + ".weight")
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
    folder, config, files = StepVideoModel.locate_checkpoint(pretrained_model_name_or_path)
    fp8_checkpoint.refuse(config, folder, "tensor parallelism (--tp_degree > 1)",
                          "split the ranks with --ulysses_degree / --cfg_parallel instead")
    dtype = ckpt.parse_dtype(torch_dtype) if torch_dtype is not None else None
    with torch.device("meta"):
        model = StepVideoModel.from_config(config, **overrides)
    rank, size = _group_rank_size(group)
    apply_tensor_parallel(model, group, tp_rank=rank, tp_size=size)

    def tensors():
        for f in files:
            yield from ckpt.iter_safetensors(f)

    ckpt.load_state_into_model(model, shard_tensors(tensors(), rank, size, TensorParallelPlan.of(model)),
                               dtype=dtype, device=device,
                               strict=True, where=str(folder))
    ckpt.assert_materialized(model, f"StepVideoModel (TP rank {rank}/{size}) from {folder}")
    return model.eval().requires_grad_(False)

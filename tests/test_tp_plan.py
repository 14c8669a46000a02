"""The tensor-parallel plan is a fact of the model class (``StepVideoModel._tp_plan``), and
``stepvideo.parallel.tensor`` only reads it. (Numerical equivalence: tests/test_parallel_dit.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from stepvideo.models.dit import StepVideoModel
from stepvideo.parallel.tensor import (RowParallelLinear, TensorParallelPlan, apply_tensor_parallel, shard_tensor,
                                       shard_tensors)
from stepvideo.testing.tiny import TINY_DIT


def _meta_model():
    with torch.device("meta"):
        return StepVideoModel.from_config(TINY_DIT["t2v"])


def test_plan_is_declared_on_the_model_and_matches_real_linears():
    plan = TensorParallelPlan.of(StepVideoModel)
    assert plan.plan is not StepVideoModel._tp_plan and plan.plan == StepVideoModel._tp_plan
    model = _meta_model()
    layers = model.config.num_layers
    for pattern, style in StepVideoModel._tp_plan.items():
        hits = [name for name, _ in model.named_modules() if plan.style(name) and
                TensorParallelPlan({pattern: style}).style(name)]
        assert len(hits) == layers, pattern                      # one linear per block
        assert all(isinstance(model.get_submodule(n), nn.Linear) for n in hits)
    assert plan.style("transformer_blocks.1.attn1.wqkv") == "colwise"
    assert plan.style("transformer_blocks.1.attn1.wo") == "rowwise"
    assert plan.style("transformer_blocks.1.attn1") is None and plan.style("proj_out") is None


def test_shards_follow_the_plan():
    d = TINY_DIT["t2v"].inner_dim
    full = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    assert torch.equal(shard_tensor("transformer_blocks.0.attn1.wqkv.weight", full, 1, 2), full[3 * d // 2:])
    wo = torch.arange(d * d, dtype=torch.float32).reshape(d, d)
    assert torch.equal(shard_tensor("transformer_blocks.0.attn1.wo.weight", wo, 0, 2), wo[:, : d // 2])
    bias = torch.arange(d, dtype=torch.float32)
    assert shard_tensor("transformer_blocks.0.ff.net.2.bias", bias, 1, 2) is bias      # row-parallel bias: whole
    assert shard_tensor("proj_out.weight", wo, 1, 2) is wo                          # not in the plan
    custom = TensorParallelPlan({"proj_out": "colwise"})
    assert dict(shard_tensors([("proj_out.weight", wo)], 1, 2, custom))["proj_out.weight"].shape == (d // 2, d)


def test_apply_reads_the_plan_of_the_given_model():
    model = apply_tensor_parallel(_meta_model(), None, tp_rank=0, tp_size=2)
    plan = TensorParallelPlan.of(model)
    for name, module in model.named_modules():
        style = plan.style(name)
        if style == "rowwise":
            assert isinstance(module, RowParallelLinear) and module.in_features * 2 == module.out_features * (
                4 if name.endswith("ff.net.2") else 1)
        elif style == "colwise":
            assert type(module) is nn.Linear and module.weight.shape[0] == module.out_features

    class NoPlan(nn.Module):
        num_attention_heads = 4
        _tp_plan = None

    with pytest.raises(ValueError, match="declares no _tp_plan"):
        apply_tensor_parallel(NoPlan(), None, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="styles must be one of"):
        TensorParallelPlan({"proj_out": "diagonal"})

"""Multi-rank DiT on CPU: Ulysses SP, TP, CFG-parallel and their mixes equal the single-process DiT.

Two spawns (2 and 4 gloo ranks) each run every case of their world size; the parent compares
every rank's output with the single-process model. Tiny fp32 DiT (4 heads x 128, 2 layers).
"""
import copy
import json
import sys
import types

import pytest
import torch

from stepvideo.loading import checkpoint as ckpt
from stepvideo.loading import layout
from stepvideo.models.dit import StepVideoModel
from stepvideo.parallel.launch import run_on_cpu_ranks
from stepvideo.parallel.parallelize import load_parallel_dit, parallelize_dit
from stepvideo.parallel.state import (ParallelConfig, ParallelState, coordinates, group_ranks,
                                      validate_before_loading)
from stepvideo.parallel.tensor import apply_tensor_parallel
from stepvideo.testing.init import init_random_weights
from stepvideo.testing.tiny import TINY

TOL = dict(rtol=1e-5, atol=1e-5)
EVEN, UNEVEN = (2, 4, 4), (3, 3, 3)          # 32 tokens; 27 tokens (not divisible by 2 or 4)

# name -> (variant, latent grid (F, h, w), ParallelConfig kwargs)
CASES = {
    2: {
        "sp2_t2v": ("t2v", EVEN, dict(ulysses_degree=2)),
        "sp2_ti2v": ("ti2v", EVEN, dict(ulysses_degree=2)),
        "sp2_t2v_uneven": ("t2v", UNEVEN, dict(ulysses_degree=2)),
        "tp2_t2v": ("t2v", EVEN, dict(tensor_parallel_degree=2)),
        "tp2_t2v_load": ("t2v", EVEN, dict(tensor_parallel_degree=2)),
        "cfg2_t2v": ("t2v", EVEN, dict(cfg_parallel=True)),
        "cfg2_ti2v": ("ti2v", EVEN, dict(cfg_parallel=2)),
    },
    4: {
        "sp4_t2v": ("t2v", EVEN, dict(ulysses_degree=4)),
        "sp4_ti2v_uneven": ("ti2v", UNEVEN, dict(ulysses_degree=4)),
        "sp2tp2_t2v": ("t2v", EVEN, dict(ulysses_degree=2, tensor_parallel_degree=2)),
        "sp2tp2_ti2v_uneven": ("ti2v", UNEVEN, dict(ulysses_degree=2, tensor_parallel_degree=2)),
        "sp2cfg2_t2v": ("t2v", EVEN, dict(ulysses_degree=2, cfg_parallel=True)),
        "tp2cfg2_ti2v": ("ti2v", EVEN, dict(tensor_parallel_degree=2, cfg_parallel=True)),
    },
}


def _model(variant):
    model = StepVideoModel.from_config(TINY.transformer_config(variant), attention_backend="sdpa")
    return init_random_weights(model, seed=0).eval().requires_grad_(False)


def _inputs(variant, grid):
    g = torch.Generator().manual_seed(1)
    f, h, w = grid
    z = TINY.z_channels
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0                                      # the uncond row has a shorter text
    kwargs = dict(hidden_states=torch.randn(2, f, z, h, w, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, TINY.llm_hidden, generator=g),
                  encoder_hidden_states_2=torch.randn(2, 4, TINY.clip_hidden, generator=g),
                  timestep=torch.tensor([0.7, 0.7]), encoder_attention_mask=mask, return_dict=False)
    if variant == "ti2v":
        kwargs.update(condition_hidden_states=torch.randn(2, f, z, h, w, generator=g), motion_score=2.0)
    return kwargs


def _worker(world_size, names, ckpt_dir):
    """Runs on every rank: each case in order (group creation is collective)."""
    base = {}
    outputs = {}
    for name in names:
        variant, grid, degrees = CASES[world_size][name]
        config = ParallelConfig(**degrees)
        validate_before_loading(config, TINY.dit_heads, world_size, token_count=grid[0] * grid[1] * grid[2])
        state = ParallelState.from_env(config)
        if name.endswith("_load"):
            dit = load_parallel_dit(ckpt_dir, state, torch_dtype=torch.float32)
        else:
            if variant not in base:
                base[variant] = _model(variant)
            dit = parallelize_dit(copy.deepcopy(base[variant]), state)
        assert dit.dtype == torch.float32 and dit.in_channels == TINY.z_channels   # wrappers read through
        with torch.no_grad():
            outputs[name] = dit(**_inputs(variant, grid))
    return outputs


@pytest.fixture(scope="module")
def references():
    out = {}
    for variant in ("t2v", "ti2v"):
        model = _model(variant)
        for grid in (EVEN, UNEVEN):
            with torch.no_grad():
                out[variant, grid] = model(**_inputs(variant, grid))
    return out


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dit") / layout.TRANSFORMER_DIR
    ckpt.save_sharded(_model("t2v").state_dict(), folder, layout.TRANSFORMER_WEIGHTS, num_shards=2)
    (folder / layout.TRANSFORMER_CONFIG).write_text(json.dumps(TINY.transformer_config("t2v")))
    return str(folder.parent)


@pytest.fixture(scope="module")
def rank_outputs(tiny_dit_dir):
    return {world: run_on_cpu_ranks(_worker, world, args=(world, list(CASES[world]), tiny_dit_dir), timeout=240)
            for world in CASES}


@pytest.mark.parametrize("world, name", [(w, n) for w in CASES for n in CASES[w]])
def test_parallel_dit_matches_single_process(rank_outputs, references, world, name):
    variant, grid, _ = CASES[world][name]
    expected = references[variant, grid]
    for rank, outputs in enumerate(rank_outputs[world]):
        got = outputs[name]
        assert got.shape == expected.shape, f"rank {rank}"
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}, rank {rank}: {m}")


# ---------------------------------------------------------------------------------------
# Single-process checks: configuration, layout, validation, size-1 default, TP shapes
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(ring_degree=2), "ring_degree"),
    (dict(ulysses_degree=0), "ulysses_degree"),
    (dict(tensor_parallel_degree=1.5), "tensor_parallel_degree"),
    (dict(cfg_parallel=3), "cfg_parallel"),
    (dict(backend="ring"), "backend"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_config_degrees_and_layout():
    config = ParallelConfig(ulysses_degree=2, tensor_parallel_degree=2, cfg_parallel=True)
    assert (config.cfg_degree, config.world_size) == (2, 8)
    assert ParallelConfig(cfg_parallel=1).cfg_degree == 1
    groups = group_ranks(config)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["sp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert coordinates(6, config) == (1, 1, 0)


def test_validate_before_loading():
    config = ParallelConfig(ulysses_degree=2, tensor_parallel_degree=4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*2 x 4 = 8"):
        validate_before_loading(config, num_heads=4, world_size=8)
    with pytest.raises(ValueError, match=r"world size \(3\).*= 2"):
        validate_before_loading(ParallelConfig(ulysses_degree=2), num_heads=4, world_size=3)
    with pytest.raises(ValueError, match=r"token count \(3\).*ulysses_degree \(4\)"):
        validate_before_loading(ParallelConfig(ulysses_degree=4), num_heads=4, world_size=4, token_count=3)
    with pytest.raises(ValueError, match=r"token count \(27\).*xfuser"):
        validate_before_loading(ParallelConfig(ulysses_degree=2, backend="xfuser"), 4, 2, token_count=27)
    plan = validate_before_loading(ParallelConfig(ulysses_degree=2), num_heads=48, world_size=2, token_count=27)
    assert plan.heads_per_rank == 24 and plan.tokens_per_rank == [14, 13] and plan.uneven


def test_single_rank_default_without_distributed(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    state = ParallelState.from_env(ParallelConfig())
    assert (state.rank, state.world_size, state.is_main, state.sp_group) == (0, 1, True, None)
    assert not torch.distributed.is_initialized()
    model = _model("t2v")
    assert parallelize_dit(model, state) is model
    from stepvideo.parallel import apply_parallelism
    assert apply_parallelism is parallelize_dit
    state.barrier()
    state.destroy()
    with pytest.raises(ValueError, match=r"WORLD_SIZE \(1\).*= 2"):
        ParallelState.from_env(ParallelConfig(ulysses_degree=2))


def test_tensor_parallel_shapes_keep_keys():
    with torch.device("meta"):
        model = StepVideoModel.from_config(TINY.transformer_config("t2v"))
    keys = list(model.state_dict())
    apply_tensor_parallel(model, None, tp_rank=1, tp_size=2)
    assert list(model.state_dict()) == keys
    block = model.transformer_blocks[0]
    d = model.inner_dim
    assert tuple(block.attn1.wqkv.weight.shape) == (3 * d // 2, d)
    assert tuple(block.attn2.wkv.weight.shape) == (d, d)
    assert tuple(block.ff.net[0].proj.weight.shape) == (2 * d, d)
    assert tuple(block.attn1.wo.weight.shape) == (d, d // 2)
    assert tuple(block.ff.net[2].weight.shape) == (d, 2 * d)


def test_xfuser_backend_reports_broken_install(monkeypatch):
    broken = types.ModuleType("xfuser.core.distributed")

    def fail(name):
        raise RuntimeError("Found no NVIDIA driver on your system")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "xfuser", types.ModuleType("xfuser"))
    monkeypatch.setitem(sys.modules, "xfuser.core", types.ModuleType("xfuser.core"))
    monkeypatch.setitem(sys.modules, "xfuser.core.distributed", broken)
    from stepvideo.parallel.xfuser_backend import import_xfuser

    with pytest.raises(RuntimeError, match=r"xfuser.*NVIDIA driver.*pip install xfuser"):
        import_xfuser()

"""stepvideo.perf: FLOP / memory models, RoPE gather, compiled-block path, FP8 linears, offload."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from stepvideo.models.dit import StepVideoModel
from stepvideo.models.blocks import gated_residual, modulate
from stepvideo.models.norms import rms_norm, rms_norm_
from stepvideo.models.rope import RoPE3D, apply_rope, apply_rope_, rotate_half_chunks, signed_sin_table
from stepvideo import fp8_linear
from stepvideo.perf import flops, memory_model
from stepvideo.perf.offload import disable_block_offload, enable_block_offload
from stepvideo.testing.init import init_random_weights


def tiny_model(dtype=torch.float32, layers=2):
    model = StepVideoModel(num_attention_heads=2, attention_head_dim=128, in_channels=8, num_layers=layers,
                           caption_channels=[64, 32], attention_backend="sdpa")
    init_random_weights(model, seed=3)
    return model.to(dtype).eval().requires_grad_(False)


def tiny_inputs(dtype=torch.float32, b=2, grid=(2, 4, 6)):
    g = torch.Generator().manual_seed(0)
    f, h, w = grid
    x = torch.randn(b, f, 8, h, w, generator=g).to(dtype)
    llm = torch.randn(b, 10, 64, generator=g).to(dtype)
    clip = torch.randn(b, 77, 32, generator=g).to(dtype)
    mask = torch.ones(b, 87)
    mask[1, 80:] = 0
    t = torch.tensor([0.7, 0.7])
    return dict(hidden_states=x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t,
                encoder_attention_mask=mask, return_dict=False)


# ---------------------------------------------------------------------------------------- models
def test_memory_model_param_count_matches_meta_model():
    with torch.device("meta"):
        model = StepVideoModel()
    assert sum(p.numel() for p in model.parameters()) == memory_model.total_params(memory_model.ModelDims())
    with torch.device("meta"):
        ti2v = StepVideoModel(use_additional_conditions=True)
    dims = memory_model.ModelDims(motion=True)
    assert sum(p.numel() for p in ti2v.parameters()) == memory_model.total_params(dims)


def test_memory_model_scaling():
    base = memory_model.estimate(75888)
    tp2 = memory_model.estimate(75888, tp=2)
    sp4 = memory_model.estimate(75888, sp=4)
    assert 0.49 < tp2["weights"] / base["weights"] < 0.52
    assert sp4["activations"] < base["activations"] and sp4["weights"] == base["weights"]
    assert base["attention_math"] > 1000 * memory_model.GIB > base["attention_fused"]
    assert memory_model.estimate(75888, fp8=True)["weights"] < 0.55 * base["weights"]
    with pytest.raises(ValueError):
        memory_model.estimate(100, sp=5)
    assert "fits" in memory_model.format_table(memory_model.table(75888))


def test_flop_model_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model()
    inputs = tiny_inputs()
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    shape = flops.DiTShape(tokens=2 * 4 * 6, text_tokens=87, width=256, layers=2, batch=2, in_channels=8,
                           caption_channels=64, clip_channels=32)
    per_step = flops.step_flops(shape)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    # the CPU SDPA kernels are not seen by FlopCounterMode: compare the block matmuls exactly
    L, Lkv, D = shape.tokens, shape.text_tokens, shape.width
    cross_core = 4 * L * Lkv * D * shape.layers * shape.batch
    block_linears = per_step["projections"] + per_step["ffn"] + per_step["cross_attention"] - cross_core
    assert counts["aten.mm"] == block_linears
    # bias-carrying Linears (addmm) and the patch conv are the embeddings / head / caption path
    small = counts.get("aten.addmm", 0) + counts.get("aten.convolution", 0)
    assert 0.5 * per_step["other"] <= small <= 2 * per_step["other"], (small, per_step["other"])


# ------------------------------------------------------------------------------------ rope, fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gather_is_bit_identical(dtype):
    x = torch.randn(2, 3 * 4 * 5, 4, 128).to(dtype)
    cos, sin = RoPE3D().tables((3, 4, 5), dtype, "cpu")
    ref = x * cos[None, :, None] + rotate_half_chunks(x) * sin[None, :, None]
    assert torch.equal(apply_rope(x, cos, sin), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_rope_is_bit_identical_on_strided_views(dtype):
    """apply_rope_ (no gather, in place) == apply_rope, on a q view of a fused [q|k|v] tensor."""
    qkv = torch.randn(2, 3 * 4 * 5, 4, 3 * 128).to(dtype)
    q = qkv[..., :128]
    cos, sin = RoPE3D().tables((3, 4, 5), dtype, "cpu")
    expected = apply_rope(q, cos, sin)
    untouched = qkv[..., 128:].clone()
    out = apply_rope_(q, cos, signed_sin_table(sin))
    assert out.data_ptr() == qkv.data_ptr() and torch.equal(out, expected)
    assert torch.equal(qkv[..., 128:], untouched)


def test_in_place_modulation_and_residual_are_bit_identical():
    g = torch.Generator().manual_seed(0)
    x, y, h = (torch.randn(2, 50, 64, generator=g).bfloat16() for _ in range(3))
    scale, shift, gate = (torch.randn(2, 1, 64, generator=g).bfloat16() for _ in range(3))
    assert torch.equal(modulate(h.clone(), scale, shift), h * (1 + scale) + shift)
    x_before = x.clone()
    assert torch.equal(gated_residual(x, gate, y.clone()), gate * y + x)
    assert torch.equal(x, x_before)                                    # the block input is not written


def test_one_pass_rms_norm_statistics():
    """rms_norm_ moves only the fp32 mean of squares: fp32 ~1e-7 relative, bf16 rare one-ulp flips."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, 128, generator=g) * 3
    w = 1 + 0.1 * torch.randn(128, generator=g)
    torch.testing.assert_close(rms_norm_(x.clone(), w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    ref, out = rms_norm(xb, wb, 1e-6), rms_norm_(xb.clone(), wb, 1e-6)
    differ = ref != out
    assert differ.float().mean() < 1e-4
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs()
    assert ((out.float() - ref.float()).abs() <= ulp)[differ].all()


def test_rope_tables_cached_per_grid_dtype_device():
    rope = RoPE3D()
    a = rope.tables((2, 3, 4), torch.float32, "cpu")
    assert rope.tables((2, 3, 4), torch.float32, "cpu")[0] is a[0]
    assert rope.tables((2, 3, 4), torch.bfloat16, "cpu")[0] is not a[0]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol,mean_tol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 3e-2, 5e-3)])
def test_compiled_blocks_equal_eager(dtype, tol, mean_tol, tmp_path, monkeypatch):
    """compile_blocks vs eager, in units of std(out): fp32 max|diff| < 1e-5; bf16 max|diff| < 3e-2
    (two bf16 ulps at |out| ~ 2; Inductor keeps fp32 intermediates inside fused kernels where
    eager rounds each op to bf16) and mean|diff| < 5e-3."""
    import torch._inductor.config as inductor_config

    from stepvideo.perf.compile import CACHE_ENV, compile_blocks

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))        # a private Inductor cache, restored afterwards
    torch._dynamo.reset()
    model = tiny_model(dtype, layers=1)
    inputs = tiny_inputs(dtype)
    eager = model(**inputs).float()
    compiled = compile_blocks(copy.deepcopy(model), cache_dir=tmp_path)
    assert set(compiled.state_dict()) == set(model.state_dict())
    with inductor_config.patch(compile_threads=1):       # no compile-worker pool on a small CPU machine
        out = compiled(**inputs).float()
    diff = (out - eager).abs()
    assert diff.max() / eager.std() < tol and diff.mean() / eager.std() < mean_tol


# ------------------------------------------------------------------------------------------ fp8
def test_fp8_quantize_round_trip():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]
    q, scale = fp8_linear.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    back = fp8_linear.dequantize_weight(q, scale)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal numbers
    rel = ((back - w).abs() / w.abs().clamp(min=1e-6))[w.abs() > scale[:, None] * 2 ** -6]
    assert rel.max() <= 2 ** -4 + 1e-6
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)


def test_fp8_linear_fallback_forward():
    lin = torch.nn.Linear(64, 32, bias=True)
    f = fp8_linear.FP8Linear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    w = fp8_linear.dequantize_weight(f.weight, f.weight_scale)
    assert torch.equal(f(x), F.linear(x, w, lin.bias))
    assert ((f(x) - lin(x)).norm() / lin(x).norm()).item() < 0.05


def test_fp8_quantize_blocks_dit_error():
    model = tiny_model()
    inputs = tiny_inputs()
    ref = model(**inputs)
    n = fp8_linear.quantize_blocks(model)
    assert n == 2 * 7
    out = model(**inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel


# -------------------------------------------------------------------------------------- offload
def test_block_offload_cpu_is_identity():
    model = tiny_model()
    inputs = tiny_inputs()
    ref = model(**inputs)
    enable_block_offload(model, "cpu", pin_memory=False)
    assert torch.equal(model(**inputs), ref)
    assert torch.equal(model(**inputs), ref)          # hooks restore the host copies
    disable_block_offload(model, "cpu")
    assert torch.equal(model(**inputs), ref)


# ------------------------------------------------------------------------------------ benchmarks
def test_bench_scripts_run_on_cpu(tmp_path, capsys):
    """The documented CPU commands of benchmark/bench_dit.py and benchmark/bench_bf16_drift.py run."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmark"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    drift = load("bench_bf16_drift")
    assert drift.main(["dump", str(tmp_path / "a.pt")]) == 0
    assert drift.main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]) == 0
    out = capsys.readouterr().out
    assert "t2v:" in out and "ti2v:" in out and out.count("bf16 bit-identical 100.0%") == 2

    bench = load("bench_dit")
    assert bench.main(["--device", "cpu", "--dtype", "fp32", "--layers", "1", "--heads", "4", "--frames", "17",
                       "--height", "64", "--width", "64", "--warmup", "1", "--steps", "1",
                       "--matmul_size", "0", "--text_tokens", "80"]) == 0
    out = capsys.readouterr().out
    assert "seconds/step" in out and "tokens=48" in out

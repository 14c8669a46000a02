"""Memory profiles: resolution, the placement order the generator follows, block streaming."""
from __future__ import annotations

import pytest
import torch

from stepvideo.perf.memory_profiles import PROFILES, Placement, resolve_profile
from stepvideo.perf.offload import disable_block_offload, enable_block_offload, streamed_bytes


def test_resolve_profile_names_and_auto_on_cpu():
    assert resolve_profile("auto", "cpu").name == "none"
    for name in ("141g", "80g", "48g", "24g", "16g", "none"):
        assert resolve_profile(name, "cpu").name == name
    with pytest.raises(ValueError, match="--memory_profile"):
        resolve_profile("12g", "cpu")


def test_auto_parks_rank0s_dit_only_for_multi_rank_runs_without_a_service():
    """``auto``: one GPU by the card's size; several ranks with ``--no_service``: rank 0 parks its
    DiT share while it encodes and decodes on a card under 141g's budget; others keep ``none``."""
    from types import SimpleNamespace

    from stepvideo.accelerator import using
    from stepvideo.perf.memory_profiles import RANK0_PARKS_DIT, run_profile
    from stepvideo.rehearsal.fake_cuda import FakeCuda

    local = SimpleNamespace(memory_profile="auto", local=True)
    service = SimpleNamespace(memory_profile="auto", local=False)
    gib = 1 << 30
    with using(FakeCuda(4, 79 * gib)):
        assert run_profile(local, 4, 0, "cuda:0") is RANK0_PARKS_DIT
        assert run_profile(local, 4, 3, "cuda:3").name == "none"
        assert run_profile(service, 4, 0, "cuda:0").name == "none"
        assert run_profile(local, 1, 0, "cuda:0").name == "80g"
        assert run_profile(SimpleNamespace(memory_profile="none", local=True), 4, 0, "cuda:0").name == "none"
    with using(FakeCuda(4, 140 * gib)):
        assert run_profile(local, 4, 0, "cuda:0").name == "none"        # 96.5 GiB fits a 141 GB card
    assert run_profile(local, 4, 0, "cpu").name == "none"
    assert RANK0_PARKS_DIT.moves_dit and not RANK0_PARKS_DIT.dit_fp8 and not RANK0_PARKS_DIT.dit_streamed_blocks


def test_memory_profile_flag_reaches_runtime_config():
    from stepvideo import cli
    from stepvideo.cli.generate import build_parser

    parser = build_parser()                  # the generate entry point's flags (runtime_config reads several groups)
    args = parser.parse_args(["--memory_profile", "48g"])
    assert cli.runtime_config(args).memory_profile == "48g"
    assert cli.runtime_config(parser.parse_args([])).memory_profile == "auto"


_ENCODERS_FIRST = [("load", "dit", "host"), ("encode", "step_llm", "device"), ("encode", "clip", "device"),
                   ("encode", "text_encoders", "released"), ("denoise", "dit", "device"), ("decode", "dit", "host"),
                   ("decode", "vae", "device"), ("decode", "vae", "released")]


@pytest.mark.parametrize("profile,expected", [
    ("80g", _ENCODERS_FIRST),
    ("48g", _ENCODERS_FIRST),
    ("24g", [("load", "dit", "device"), ("encode", "step_llm", "streamed"), ("encode", "clip", "device"),
             ("encode", "text_encoders", "released"), ("decode", "vae", "device, tiles 16"),
             ("decode", "vae", "released")]),
])
def test_generator_follows_the_profile_order(tiny_model_dir, tmp_path, profile, expected):
    """The generator on CPU (the 'device' is the CPU too) logs every placement step in order, and
    the profile's DiT (streamed blocks, fp8) still produces the video."""
    from stepvideo.config import OutputConfig, get_preset
    from stepvideo.parallel.state import ParallelState
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator

    runtime = RuntimeConfig(model_dir=str(tiny_model_dir), dtype="fp32", local=True, memory_profile=profile)
    generator = VideoGenerator(runtime, ParallelState.single(device="cpu"))
    sampling = get_preset("t2v").with_overrides(num_frames=17, height=64, width=64, num_inference_steps=1)
    out = OutputConfig(save_path=str(tmp_path), output_path=str(tmp_path / f"{profile}.mp4"))
    generator.generate("a cat", sampling, out, progress=False)
    assert generator.placement.events == expected
    assert (tmp_path / f"{profile}.mp4").is_file()
    streamer = getattr(generator.dit, "_block_streamer", None)
    from stepvideo.fp8_linear import FP8Linear
    fp8 = any(isinstance(m, FP8Linear) for m in generator.dit.modules())
    assert fp8 == (profile == "48g")                         # 80g and 24g keep bf16 (here fp32) blocks
    if profile == "80g":
        assert streamer is None                              # all 48 blocks resident: nothing streams per step
    else:
        assert streamer is not None and streamer.loads > 0
        layers = len(generator.dit.transformer_blocks)
        assert len(streamer.blocks) == (min(4, layers) if profile == "48g" else layers)
    if profile == "48g":
        assert streamer.device_blocks() == 0            # the DiT left the device for the decode, prefetch too


def _stack(layers=4, width=32):
    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
    model.head = torch.nn.Linear(width, 3)
    return model


def _run(model, x):
    for block in model.transformer_blocks:
        x = torch.tanh(block(x))
    return model.head(x)


def test_block_streaming_with_prefetch_is_exact_and_bounded():
    torch.manual_seed(0)
    model = _stack()
    x = torch.randn(5, 32)
    ref = _run(model, x)
    enable_block_offload(model, "cpu", pin_memory=False, resident=1)
    streamer = model._block_streamer
    seen = []
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda m, a, o: seen.append(streamer.device_blocks()))
    assert torch.equal(_run(model, x), ref)
    assert torch.equal(_run(model, x), ref)
    # 3 streamed blocks, each copied once per forward, plus the first one prefetched for the next forward
    assert streamer.loads == 2 * 3 + 1                      # the wrap-around prefetch of the first one
    assert max(seen) <= 2                                  # running block + the prefetched one
    assert streamed_bytes(model) == 3 * (32 * 32 + 32) * 4
    disable_block_offload(model, "cpu")
    assert torch.equal(_run(model, x), ref)


def test_placement_without_moves_for_none():
    placement = Placement(PROFILES["none"], "cpu")
    assert placement.dit_load_device() == torch.device("cpu")
    assert not PROFILES["none"].moves_dit and PROFILES["80g"].moves_dit

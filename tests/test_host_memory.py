"""Host memory: the accounting against real RSS on CPU, the RAM seam and pre-flight, disk streaming."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepvideo.perf.memory_profiles import PROFILES
from stepvideo.perf import host_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (smaps, VmHWM reset)")
def test_host_accounting_matches_rss_and_disk_streaming_stays_bounded(tmp_path):
    """A bf16 DiT of width 1024 (4 blocks of 32 MiB) in a fresh process: held in RAM and streamed,
    the resident bytes are within 10% of the accounted DiT; disk-streamed, the non-block weights
    are within 10% and the peak over three forwards stays under the stated bound."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stepvideo.testing.host_rss", str(tmp_path / "transformer"),
                           "--write", "8", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: round(v / 2 ** 20, 1) for k, v in r.items() if k != "disk_blocks_loaded"})
    assert r["block"] > 30 * 2 ** 20
    assert abs(r["held_streaming_in_ram"] - r["dit_loaded"]) <= 0.10 * r["dit_loaded"]
    assert abs(r["held_disk_after_load"] - r["dit_other"]) <= 0.10 * r["dit_other"]
    assert r["disk_step_hwm"] <= r["disk_bound"]
    assert r["disk_step_hwm"] >= 2 * r["block"]            # the blocks really pass through memory
    assert r["disk_bytes_read"] >= 3 * 4 * r["block"]       # three passes over four blocks


def test_disk_streamed_dit_equals_the_loaded_one(tiny_model_dir):
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.perf.disk_stream import load_dit_from_disk
    from stepvideo.fp8_linear import quantize_blocks
    from stepvideo.perf.offload import enable_block_offload, streamed_bytes

    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 3, 8, 4, 4, generator=g), encoder_hidden_states=torch.randn(2, 20, 128, generator=g),
              encoder_hidden_states_2=torch.randn(2, 77, 64, generator=g), timestep=torch.tensor([0.3, 0.3]),
              return_dict=False)
    folder = tiny_model_dir / "transformer"
    ref = StepVideoModel.from_pretrained(folder, torch_dtype=torch.float32, attention_backend="sdpa")
    with torch.no_grad():
        whole = ref(**kw)
        quantize_blocks(ref)
        whole_fp8 = ref(**kw)
        for fp8, expected in ((False, whole), (True, whole_fp8)):
            model, source = load_dit_from_disk(folder, torch_dtype=torch.float32, fp8=fp8, attention_backend="sdpa")
            assert all(p.numel() == 0 for p in model.transformer_blocks.parameters())      # nothing read yet
            enable_block_offload(model, "cpu", pin_memory=False, blocks=model.transformer_blocks, source=source)
            assert torch.equal(model(**kw), expected) and torch.equal(model(**kw), expected)
            assert source.bytes_read >= 2 * streamed_bytes(model) > 0


def _sizes(profile, gib_blocks=27.0):
    g = host_memory.GIB
    return host_memory.HostSizes(dit_loaded=int(55 * g), dit_other=int(0.7 * g), dit_block=int(gib_blocks / 48 * g),
                                 dit_blocks=int(gib_blocks * g), llm=int(36.5 * g), clip=int(1.3 * g),
                                 largest_tensor=int(0.75 * g), frames_peak=int(1.5 * g),
                                 frames=int(0.6 * g), frame=3 * 2 ** 20)


def test_small_host_refused_in_one_line_or_switched_to_disk(monkeypatch):
    """The seam (STEPVIDEO_HOST_RAM_GIB) caps 'available RAM'; 16g held in RAM needs ~65 GiB."""
    profile = PROFILES["16g"]
    held = host_memory.host_plan(profile, _sizes(profile))
    disk = host_memory.host_plan(profile, _sizes(profile), disk=True)
    assert disk.peak < held.peak and disk.read_per_step == 48 * _sizes(profile).dit_block
    monkeypatch.setenv(host_memory.HOST_RAM_ENV, "48")
    assert host_memory.available_host_bytes() == 48 * host_memory.GIB
    with pytest.raises(host_memory.HostMemoryError) as err:
        host_memory.choose_for_host(profile, _sizes, auto=False)
    line = str(err.value)
    assert "\n" not in line and f"{held.peak / host_memory.GIB:.1f} GiB" in line and "48.0 GiB available" in line
    assert "--stream_from_disk fits" in line
    choice = host_memory.choose_for_host(profile, _sizes, auto=True)
    assert choice.disk and choice.plan.peak == disk.peak
    monkeypatch.setenv(host_memory.HOST_RAM_ENV, "512")
    assert not host_memory.choose_for_host(profile, _sizes, auto=True).disk


def test_preflight_refuses_before_any_weight_is_read(tiny_model_dir, tmp_path):
    """run_parallel.py --local on a 'host' of 1 MiB: exit 2, one line naming both figures and what fits."""
    env = {**os.environ, host_memory.HOST_RAM_ENV: str(1 / 1024), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "run_parallel.py", "--local", "--model_dir", str(tiny_model_dir),
                           "--prompt", "a cat", "--memory_profile", "24g", "--num_frames", "17", "--height", "64",
                           "--width", "64", "--infer_steps", "1", "--output_path", str(tmp_path / "v.mp4")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--memory_profile 24g needs" in lines[0] and "GiB available" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_bench_memory_sizes_match_the_checkpoint_headers(tiny_model_dir):
    """Pre-flight reads sizes from the safetensors headers; they agree with the loaded tiny DiT."""
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.perf import memory_accounting as acc

    sizes = host_memory.sizes_from_checkpoint(tiny_model_dir, PROFILES["24g"], 64, 64, 17)
    model = StepVideoModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16, attention_backend="sdpa")
    assert sizes.dit_loaded == acc.module_bytes(model)
    assert sizes.dit_block == acc.block_bytes(model)
    assert sizes.llm > 0 and sizes.clip > 0
    fp8 = host_memory.sizes_from_checkpoint(tiny_model_dir, PROFILES["16g"], 64, 64, 17)
    assert fp8.dit_block < 0.6 * sizes.dit_block


def test_generator_16g_streams_fp8_blocks_from_disk(tiny_model_dir, tmp_path):
    """The 16g profile with --stream_from_disk on CPU: blocks read from the files (quantised to fp8
    on the way), token-chunked, and a video comes out."""
    from stepvideo.config import OutputConfig, get_preset
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator
    from stepvideo.models.token_chunks import token_chunk_of
    from stepvideo.parallel.state import ParallelState
    from stepvideo.fp8_linear import FP8Linear

    runtime = RuntimeConfig(model_dir=str(tiny_model_dir), dtype="fp32", local=True, memory_profile="16g",
                            stream_from_disk=True)
    generator = VideoGenerator(runtime, ParallelState.single(device="cpu"))
    sampling = get_preset("t2v").with_overrides(num_frames=17, height=64, width=64, num_inference_steps=1)
    out = OutputConfig(save_path=str(tmp_path), output_path=str(tmp_path / "16g.mp4"))
    generator.generate("a cat", sampling, out, progress=False)
    assert ("load", "dit_blocks", "disk") in generator.placement.events
    streamer = generator.dit._block_streamer
    assert streamer.source is not None and streamer.source.bytes_read > 0
    assert any(isinstance(m, FP8Linear) for m in generator.dit.modules())
    assert token_chunk_of(generator.dit) == PROFILES["16g"].token_chunk
    assert (tmp_path / "16g.mp4").is_file()


def test_stream_from_disk_needs_a_streaming_profile(tiny_model_dir):
    from stepvideo.config import get_preset
    from stepvideo.runtime.generator import RuntimeConfig
    from stepvideo.perf.memory_profiles import check_host

    sampling = get_preset("t2v").with_overrides(num_frames=17, height=64, width=64)
    runtime = RuntimeConfig(model_dir=str(tiny_model_dir), local=True, memory_profile="80g", stream_from_disk=True)
    with pytest.raises(host_memory.HostMemoryError, match="--stream_from_disk needs a profile .*24g, 16g"):
        check_host(runtime, sampling)
    ok = check_host(RuntimeConfig(model_dir=str(tiny_model_dir), local=True, memory_profile="16g",
                                  stream_from_disk=True), sampling)
    assert ok.disk and ok.plan.read_per_step > 0

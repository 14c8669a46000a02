"""fp8 checkpoints written once (``python -m stepvideo.quantize``) and loaded as stored.

The folder must give bit for bit what load-time quantisation (``--fp8``, the 48g profile) of the
same bf16 folder gives; an interrupted, corrupt or misused folder is one clear error at load.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepvideo.loading import checkpoint as ckpt
from stepvideo.loading import fp8_checkpoint as fmt8
from stepvideo.loading import layout
from stepvideo.models.dit import StepVideoModel
from stepvideo.fp8_linear import FP8, FP8Linear, block_linears, quantize_blocks
from stepvideo.quantize import quantize_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp8_dirs(tiny_model_dir, tiny_ti2v_model_dir, tmp_path_factory):
    """The tiny T2V and TI2V folders quantised (stepvideo format) and the T2V one in comfy format."""
    out = tmp_path_factory.mktemp("fp8")
    return {"t2v": quantize_model_dir(tiny_model_dir, out / "t2v", progress=False).out_dir,
            "ti2v": quantize_model_dir(tiny_ti2v_model_dir, out / "ti2v", progress=False).out_dir,
            "comfy": quantize_model_dir(tiny_model_dir, out / "comfy", "comfy", progress=False).out_dir}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(_bits(sa[key]), _bits(sb[key])), key


def _headers(folder: Path) -> dict:
    headers = {}
    for f in ckpt.find_weight_files(folder / layout.TRANSFORMER_DIR, layout.TRANSFORMER_WEIGHTS):
        headers.update({k: v for k, v in ckpt.check_safetensors_file(f).items() if k != "__metadata__"})
    return headers


@pytest.mark.parametrize("fmt", ["t2v", "comfy"])
def test_loaded_fp8_folder_equals_load_time_quantisation(tiny_model_dir, fp8_dirs, fmt):
    """Both formats load to the state dict quantize_blocks builds from the source, fp8 as stored."""
    expected = StepVideoModel.from_pretrained(tiny_model_dir, torch_dtype="fp32")
    quantize_blocks(expected)
    loaded = StepVideoModel.from_pretrained(fp8_dirs[fmt], torch_dtype="fp32")
    _same_state(expected, loaded)
    layers = [m for m in loaded.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == len(block_linears(StepVideoModel.from_config(json.loads(
        (tiny_model_dir / "transformer" / "config.json").read_text())))) > 0
    assert all(m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32 for m in layers)


@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_generator_frames_equal_load_time_quantisation(tiny_model_dir, tiny_ti2v_model_dir, fp8_dirs, tmp_path,
                                                       variant):
    """The 48g profile on the fp8 folder (no host quantisation) writes the frames that the 48g
    profile's load-time quantisation of the bf16 folder writes, T2V and TI2V."""
    from PIL import Image

    from stepvideo.config import OutputConfig, get_preset
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator
    from stepvideo.io.video import read_mp4
    from stepvideo.parallel.state import ParallelState

    image = None
    if variant == "ti2v":
        image = tmp_path / "first.png"
        Image.new("RGB", (64, 64), (30, 120, 200)).save(image)
    sampling = get_preset(variant).with_overrides(num_frames=17, height=64, width=64, num_inference_steps=1, seed=3)
    results = {}
    for name, folder in (("bf16", tiny_model_dir if variant == "t2v" else tiny_ti2v_model_dir),
                         ("fp8", fp8_dirs[variant])):
        runtime = RuntimeConfig(model_dir=str(folder), dtype="fp32", local=True, memory_profile="48g")
        generator = VideoGenerator(runtime, ParallelState.single(device="cpu"))
        out = OutputConfig(save_path=str(tmp_path), output_path=str(tmp_path / f"{name}.mp4"))
        result = generator.generate("a cat", sampling, out, first_image=image, progress=False)
        results[name] = (result.latents, read_mp4(tmp_path / f"{name}.mp4")[0])
        assert sum(isinstance(m, FP8Linear) for m in generator.dit.modules()) > 0
        del generator
    assert torch.equal(results["bf16"][0], results["fp8"][0])
    assert (results["bf16"][1] == results["fp8"][1]).all()


def test_comfy_key_layout(tiny_model_dir, fp8_dirs):
    """ComfyUI scaled fp8: ``scaled_fp8`` marker (fp8), ``<layer>.weight`` fp8 and
    ``<layer>.scale_weight`` fp32 per layer; every other tensor as in the source."""
    source, comfy, ours = _headers(tiny_model_dir), _headers(fp8_dirs["comfy"]), _headers(fp8_dirs["t2v"])
    config = json.loads((fp8_dirs["comfy"] / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = StepVideoModel.from_config(config)
    linears = [name for name, *_ in block_linears(model)]
    assert comfy["scaled_fp8"]["dtype"] == "F8_E4M3" and comfy["scaled_fp8"]["shape"] == [0]
    for name in linears:
        out, inp = source[f"{name}.weight"]["shape"]
        assert comfy[f"{name}.weight"] == {**comfy[f"{name}.weight"], "dtype": "F8_E4M3", "shape": [out, inp]}
        assert comfy[f"{name}.scale_weight"]["dtype"] == "F32" and comfy[f"{name}.scale_weight"]["shape"] == [out, 1]
        assert ours[f"{name}.weight_scale"]["dtype"] == "F32" and ours[f"{name}.weight_scale"]["shape"] == [out]
    assert not any(k.endswith(".weight_scale") for k in comfy)
    quantised = {f"{n}.weight" for n in linears} | {f"{n}.scale_weight" for n in linears} | {"scaled_fp8"}
    rest = {k: (v["dtype"], v["shape"]) for k, v in comfy.items() if k not in quantised}
    assert rest == {k: (v["dtype"], v["shape"]) for k, v in source.items() if k not in quantised}
    record = config["quantization"]
    assert record["format"] == "comfy" and record["scale_layout"] == "per_output_channel"
    assert len(record["source"]["sha256"]) == 64 and record["linears"] == len(linears)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _rewrite_shard(folder: Path, key: str, change) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "transformer" / f"{layout.TRANSFORMER_WEIGHTS}.safetensors.index.json").read_text())
    shard = folder / "transformer" / index["weight_map"][key]
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))


def test_missing_or_corrupt_scale_is_one_clear_error_at_load(fp8_dirs, tmp_path):
    key = "transformer_blocks.1.ff.net.2.weight_scale"
    missing = _copy(fp8_dirs["t2v"], tmp_path / "missing")
    _rewrite_shard(missing, key, lambda t: t.pop(key))
    with pytest.raises(fmt8.FP8CheckpointError, match=rf"incomplete or corrupt: {key} \(the scale of .*\) is missing"):
        StepVideoModel.from_pretrained(missing, torch_dtype="fp32")
    corrupt = _copy(fp8_dirs["t2v"], tmp_path / "corrupt")
    _rewrite_shard(corrupt, key, lambda t: t[key].__setitem__(0, float("nan")))
    with pytest.raises(fmt8.FP8CheckpointError, match=rf"is corrupt: {key} has 1 non-finite or non-positive"):
        StepVideoModel.from_pretrained(corrupt, torch_dtype="fp32")
    wrong = _copy(fp8_dirs["t2v"], tmp_path / "wrong")
    _rewrite_shard(wrong, key, lambda t: t.__setitem__(key, t[key].half()))
    with pytest.raises(fmt8.FP8CheckpointError, match=rf"{key} is F16 .*expected F32"):
        StepVideoModel.from_pretrained(wrong, torch_dtype="fp32")


def test_fp8_folder_under_a_bf16_profile_or_tensor_parallelism_is_refused(fp8_dirs):
    from stepvideo.errors import is_user_error, one_line
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator
    from stepvideo.parallel.state import ParallelState
    from stepvideo.parallel.tensor import load_tensor_parallel_dit

    runtime = RuntimeConfig(model_dir=str(fp8_dirs["t2v"]), dtype="fp32", local=True, memory_profile="80g")
    with pytest.raises(fmt8.FP8CheckpointError) as err:
        VideoGenerator(runtime, ParallelState.single(device="cpu"))
    line = one_line(err.value)
    assert is_user_error(err.value) and str(fp8_dirs["t2v"]) in line and "--memory_profile 80g" in line
    assert "--memory_profile 48g" in line and "made from" in line
    with pytest.raises(fmt8.FP8CheckpointError, match="tensor parallelism"):
        load_tensor_parallel_dit(fp8_dirs["t2v"], None)
    from stepvideo.config import get_preset
    from stepvideo.quality.lossless import LosslessRunner, LosslessSetup

    with pytest.raises(fmt8.FP8CheckpointError, match="lossless.py"):          # its baseline must be bf16
        LosslessRunner(LosslessSetup(RuntimeConfig(model_dir=str(fp8_dirs["t2v"]), local=True), get_preset("t2v")))


def test_quantiser_refuses_an_existing_output_and_an_fp8_source(tiny_model_dir, fp8_dirs, tmp_path):
    with pytest.raises(FileExistsError):
        quantize_model_dir(tiny_model_dir, fp8_dirs["t2v"], progress=False)
    with pytest.raises(ValueError, match="already an fp8 checkpoint"):
        quantize_model_dir(fp8_dirs["t2v"], tmp_path / "again", progress=False)


def test_killed_quantisation_leaves_nothing_a_loader_accepts(tmp_path):
    """SIGKILL the real command while it writes: no OUT folder, the hidden partial one is refused
    by the loader, and the next run removes it and writes a complete folder."""
    from stepvideo.testing.tiny import write_tiny_model_dir

    source = write_tiny_model_dir(tmp_path / "src", parts=["transformer", "scheduler"], dit_shards=6)
    out = tmp_path / "out-fp8"
    cmd = [sys.executable, "-m", "stepvideo.quantize", str(source), "--out", str(out), "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".out-fp8.quantizing-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (partial / "transformer").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the quantiser finished before it could be killed"
    assert not out.exists() and partial.is_dir()
    for folder in (partial, partial / "transformer"):
        with pytest.raises((fmt8.FP8CheckpointError, FileNotFoundError)):
            StepVideoModel.from_pretrained(folder, torch_dtype="fp32")
    assert quantize_model_dir(source, out, progress=False).out_dir == out and not partial.exists()
    assert sum(isinstance(m, FP8Linear) for m in StepVideoModel.from_pretrained(out, torch_dtype="fp32").modules())


def test_resident_size_of_the_file_is_what_the_accounting_counts(tiny_model_dir, fp8_dirs):
    """The headers' byte count of an fp8 folder (what bench_memory --model_dir prints) equals the
    loaded model's bytes as the memory accounting measures them, and about halves the source's."""
    from stepvideo.perf.memory_accounting import module_bytes

    sizes = fmt8.resident_bytes(fp8_dirs["t2v"])
    loaded = StepVideoModel.from_pretrained(fp8_dirs["t2v"], torch_dtype="fp32")   # the tiny files are fp32
    assert sum(sizes.values()) == module_bytes(loaded)
    assert set(sizes) == {"F8_E4M3", "F32"}
    source = sum(fmt8.resident_bytes(tiny_model_dir).values())
    assert sum(sizes.values()) < 0.5 * source


def test_bf16_source_at_bf16_equals_load_time_quantisation(tiny_model_dir, tmp_path):
    """The official case: weights stored in bf16, run in bf16 (the tiny factory stores fp32)."""
    from safetensors.torch import load_file

    source = tmp_path / "bf16"
    folder = source / layout.TRANSFORMER_DIR
    state = {}
    for f in ckpt.find_weight_files(tiny_model_dir / layout.TRANSFORMER_DIR, layout.TRANSFORMER_WEIGHTS):
        state.update({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()})
    ckpt.save_sharded(state, folder, layout.TRANSFORMER_WEIGHTS, num_shards=2)
    shutil.copy(tiny_model_dir / layout.TRANSFORMER_DIR / layout.TRANSFORMER_CONFIG, folder)
    out = quantize_model_dir(source, tmp_path / "fp8", progress=False).out_dir
    assert json.loads((out / "transformer" / "config.json").read_text())["quantization"]["quantized_from_dtype"] == "BF16"
    expected = StepVideoModel.from_pretrained(source, torch_dtype="bf16")
    quantize_blocks(expected)
    _same_state(expected, StepVideoModel.from_pretrained(out, torch_dtype="bf16"))

"""Numbers do not move: the tiny T2V and TI2V outputs (bf16 and fp32) equal, bit for bit, those
saved from main before the structural rework of issue 19 (``tests/data/numbers_guard.*``).

Two paths are held: ``StepVideoPipeline.__call__`` with local components (latents and decoded
frames) and ``VideoGenerator.generate`` in one-process ``--no_service`` mode (latents and the
frames it writes). Regenerate the file only for a change that is meant to move numbers:

    PYTHONPATH=. python tests/test_numbers_guard.py --write
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
SUMMARY = DATA / "numbers_guard.json"
LATENTS = DATA / "numbers_guard.safetensors"
SIZE = dict(num_frames=17, height=32, width=48, num_inference_steps=2)
SEED = 7
CASES = [(variant, dtype, path) for variant in ("t2v", "ti2v") for dtype in ("bf16", "fp32")
         for path in ("pipeline", "generator")]


def _image() -> "object":
    from PIL import Image

    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8))


def _sampling(variant: str):
    from stepvideo.config import get_preset

    return get_preset(variant).with_overrides(seed=SEED, **SIZE)


def _run_pipeline(model_dir: Path, variant: str, dtype: str):
    from stepvideo.components import LocalVAE
    from stepvideo.loading import layout
    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.pipelines.pipeline import StepVideoPipeline
    from stepvideo.text_encoders.caption import CaptionEncoder

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    vae = LocalVAE(AutoencoderKL.from_pretrained(model_dir / layout.VAE_DIR, device="cpu"), output="float")
    pipe = StepVideoPipeline.from_pretrained(model_dir, torch_dtype=torch_dtype, device="cpu",
                                             caption_encoder=CaptionEncoder.from_pretrained(model_dir, device="cpu"),
                                             vae=vae)
    out = pipe(prompt="a red fox in snow", sampling=_sampling(variant), output_type="np", progress=False,
               first_image=_image() if variant == "ti2v" else None)
    return out.latents, out.video


def _run_generator(model_dir: Path, variant: str, dtype: str, out_dir: Path):
    from stepvideo.config import OutputConfig
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator
    from stepvideo.parallel.state import ParallelState

    runtime = RuntimeConfig(model_dir=str(model_dir), dtype=dtype, local=True, memory_profile="none")
    generator = VideoGenerator(runtime, ParallelState.single(device="cpu"))
    output = OutputConfig(save_path=str(out_dir), output_path=str(out_dir / f"{variant}-{dtype}.mp4"))
    out = generator.generate("a red fox in snow", _sampling(variant), output,
                             first_image=_image() if variant == "ti2v" else None, progress=False)
    return out.latents, out.video


def run_case(model_dirs: dict, variant: str, dtype: str, path: str, out_dir: Path):
    """``(latents fp32 [B, F, C, h, w], frames uint8 [T, H, W, 3])`` of one case."""
    if path == "pipeline":
        latents, frames = _run_pipeline(model_dirs[variant], variant, dtype)
    else:
        latents, frames = _run_generator(model_dirs[variant], variant, dtype, out_dir)
    return latents.detach().float().cpu().contiguous(), np.ascontiguousarray(np.asarray(frames))


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def _key(variant, dtype, path) -> str:
    return f"{variant}.{dtype}.{path}"


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tiny_ti2v_model_dir):
    return {"t2v": tiny_model_dir, "ti2v": tiny_ti2v_model_dir}


@pytest.mark.parametrize("variant,dtype,path", CASES, ids=[_key(*c) for c in CASES])
def test_outputs_are_bit_identical_to_main(model_dirs, tmp_path, variant, dtype, path):
    from safetensors.torch import load_file

    saved = json.loads(SUMMARY.read_text())[_key(variant, dtype, path)]
    latents, frames = run_case(model_dirs, variant, dtype, path, tmp_path)
    expected = load_file(str(LATENTS))[_key(variant, dtype, path)]
    assert latents.shape == expected.shape
    assert torch.equal(latents, expected), f"latents moved: max |diff| {(latents - expected).abs().max().item()}"
    assert list(frames.shape) == saved["frames_shape"]
    assert _digest(frames) == saved["frames_sha256"], "decoded frames moved"


def write(out_root: Path) -> None:
    """Write ``tests/data/numbers_guard.*`` from the code on ``PYTHONPATH``."""
    from safetensors.torch import save_file

    from stepvideo.testing.tiny import write_tiny_model_dir

    dirs = {v: write_tiny_model_dir(out_root / v, variant=v, seed=0) for v in ("t2v", "ti2v")}
    summary, tensors = {}, {}
    for case in CASES:
        latents, frames = run_case(dirs, *case, out_root)
        summary[_key(*case)] = {"frames_shape": list(frames.shape), "frames_sha256": _digest(frames),
                                "latents_sha256": _digest(latents.numpy())}
        tensors[_key(*case)] = latents
        print(_key(*case), list(latents.shape), list(frames.shape))
    DATA.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(LATENTS))


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_numbers_guard.py --write")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))

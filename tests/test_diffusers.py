"""Step-Video the diffusers way, with the real diffusers package on the tiny model.

Load (official layout), call, save, reload with STOCK ``diffusers.DiffusionPipeline``, the same
frames as ``StepVideoPipeline`` (fp32, bf16) and as ``run_parallel.py --seed``, every output
type, ``export_to_video`` read back, ``callback_on_step_end``, the golden pipeline cases, and
diffusers' caches on our DiT.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,  # noqa: E402
                             PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
from diffusers.utils import export_to_video  # noqa: E402

from stepvideo.components import LocalVAE  # noqa: E402
from stepvideo.config import PRESETS  # noqa: E402
from stepvideo.diffusers import (StepVideoFlowMatchScheduler, StepVideoImageToVideoPipeline,  # noqa: E402
                                 StepVideoTextToVideoPipeline, StepVideoTransformer3DModel)
from stepvideo.diffusers.cache import calibrate_mag_ratios  # noqa: E402
from stepvideo.io.video import read_mp4, write_mp4  # noqa: E402
from stepvideo.models.vae import AutoencoderKL  # noqa: E402
from stepvideo.perf.cache import BlockEvaluations  # noqa: E402
from stepvideo.pipelines.pipeline import StepVideoPipeline  # noqa: E402
from stepvideo.text_encoders.caption import CaptionEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(height=64, width=64, num_frames=17, num_inference_steps=2)
SEED = 5


def _call(pipe, **kwargs):
    return pipe("a red fox in the snow", generator=torch.Generator().manual_seed(SEED), **{**SIZE, **kwargs})


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return _quiet(StepVideoTextToVideoPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32))


@pytest.fixture(scope="module")
def frames(pipe):
    return _call(pipe).frames


@pytest.fixture(scope="module")
def pipe_bf16(tiny_model_dir):
    """The default dtype (bf16 DiT and VAE): what ``run_parallel.py`` runs by default."""
    return _quiet(StepVideoTextToVideoPipeline.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def frames_bf16(pipe_bf16):
    return _call(pipe_bf16).frames


@pytest.fixture(scope="module")
def saved(pipe_bf16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "stepvideo-tiny-diffusers"
    pipe_bf16.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock(saved):
    return _quiet(DiffusionPipeline.from_pretrained(saved, trust_remote_code=True))


def test_import_stepvideo_does_not_import_diffusers():
    code = ("import sys, stepvideo, stepvideo.runtime.generator, stepvideo.cli, stepvideo.job_server.requests, "
            "stepvideo.perf.cache; assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_frames_as_stepvideo_pipeline(request, tiny_model_dir, dtype):
    """Independently loaded ``StepVideoPipeline`` + our VAE and encoders, the same seed."""
    got = request.getfixturevalue("frames" if dtype == torch.float32 else "frames_bf16")
    reference = StepVideoPipeline.from_pretrained(tiny_model_dir, torch_dtype=dtype,
                                                  caption_encoder=CaptionEncoder.from_pretrained(tiny_model_dir),
                                                  vae=LocalVAE(AutoencoderKL.from_pretrained(tiny_model_dir, dtype)))
    preset = PRESETS["t2v"]
    expected = reference("a red fox in the snow", pos_magic=preset.pos_magic, neg_magic=preset.neg_magic,
                         seed=SEED, output_type="np", progress=False, **SIZE).video
    assert got.shape == (1, 17, 64, 64, 3) and got.dtype == np.float32
    np.testing.assert_array_equal((got[0] * 255).round().astype(np.uint8), expected)


def test_stock_diffusers_reload_same_frames_and_layout(saved, stock, frames_bf16):
    index = (saved / "model_index.json").read_text()
    assert '"stepvideo.diffusers.transformer"' in index and '"pipeline_stepvideo"' in index
    assert (saved / "vae" / "vae_v2.safetensors").is_file() and (saved / "caption_encoder" / "step_llm").is_dir()
    assert type(stock) is StepVideoTextToVideoPipeline
    assert isinstance(stock.transformer, StepVideoTransformer3DModel)
    assert isinstance(stock.scheduler, StepVideoFlowMatchScheduler)
    assert stock.transformer.dtype == stock.vae.dtype == torch.bfloat16           # as saved
    np.testing.assert_array_equal(_call(stock).frames, frames_bf16)


def test_same_frames_as_run_parallel(tmp_path, tiny_model_dir, stock):
    """``run_parallel.py --seed s`` (one process, in-process encoders and VAE, bf16) and the
    reloaded stock pipeline with ``generator=torch.Generator().manual_seed(s)``: identical frames."""
    out = tmp_path / "run_parallel.mp4"
    cmd = [sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", str(tiny_model_dir),
           "--prompt", "a red fox in the snow", "--num_frames", "17", "--height", "64", "--width", "64",
           "--infer_steps", "2", "--dtype", "bf16", "--seed", str(SEED), "--no_service", "--no_denoise_filter",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = (_call(stock).frames[0] * 255).round().astype(np.uint8)
    mine = write_mp4(tmp_path / "diffusers.mp4", ours, denoise=False)
    np.testing.assert_array_equal(read_mp4(out)[0], read_mp4(mine)[0])


def test_caption_and_vae_through_the_service(tiny_service, pipe_bf16, frames_bf16):
    """No local text encoders or VAE: the caption/VAE service gives the same frames."""
    url, token = tiny_service
    remote = _quiet(StepVideoTextToVideoPipeline(pipe_bf16.transformer, pipe_bf16.scheduler))
    remote.setup_service(caption_url=url, vae_url=url, token=token)
    np.testing.assert_array_equal(_call(remote).frames, frames_bf16)


def test_output_types_and_export_to_video(pipe, frames, tmp_path):
    pt = _call(pipe, output_type="pt").frames
    assert pt.shape == (1, 17, 3, 64, 64)
    np.testing.assert_array_equal(pt.permute(0, 1, 3, 4, 2).numpy(), frames)
    pil = _call(pipe, output_type="pil", return_dict=False)[0]
    assert len(pil[0]) == 17 and np.array_equal(np.asarray(pil[0][3]), (frames[0, 3] * 255).round().astype(np.uint8))
    latents = _call(pipe, output_type="latent").frames
    assert latents.shape == (1, 3, 8, 4, 4) and latents.dtype == torch.float32
    path = export_to_video(list(frames[0]), str(tmp_path / "fox.mp4"), fps=8)
    video, _ = read_mp4(path)
    assert video.shape == (17, 64, 64, 3)


def test_callback_on_step_end_replaces_latents(pipe):
    seen = []

    def on_step_end(p, step, t, tensors):
        seen.append((step, tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == SIZE["num_inference_steps"] - 1 else {}

    latents = _call(pipe, output_type="latent", callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents"]).frames
    assert seen == [(0, ("latents",)), (1, ("latents",))]
    assert torch.count_nonzero(latents) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _call(pipe, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds"])


@pytest.mark.parametrize("case", ["pipeline_t2v", "pipeline_ti2v"])
def test_golden_pipelines_through_diffusers(golden, case):
    spec, data = golden.case(case), golden.data(case)
    transformer = StepVideoTransformer3DModel(**spec["constructor"]["transformer_kwargs"])
    transformer.load_state_dict(golden.dit_model(case).state_dict(), strict=True)
    scheduler = StepVideoFlowMatchScheduler(**spec["constructor"]["scheduler_kwargs"])
    cls = StepVideoImageToVideoPipeline if case == "pipeline_ti2v" else StepVideoTextToVideoPipeline
    pipe = _quiet(cls(transformer.eval(), scheduler))
    kwargs = dict(spec["call"]["kwargs"])
    extra = {}
    if case == "pipeline_ti2v":
        kwargs.pop("first_image")
        extra = dict(condition_latents=data["inputs.first_frame_latent"], motion_score=kwargs.pop("motion_score"))
    embeds = {"y": data["inputs.y"], "y_mask": data["inputs.y_mask"], "clip_embedding": data["inputs.clip_embedding"]}
    latents = pipe(prompt=kwargs["prompt"], negative_prompt=kwargs["neg_magic"], pos_magic=kwargs["pos_magic"],
                   height=kwargs["height"], width=kwargs["width"], num_frames=kwargs["num_frames"],
                   num_inference_steps=kwargs["num_inference_steps"], guidance_scale=kwargs["guidance_scale"],
                   time_shift=kwargs["time_shift"], latents=data["inputs.latents"], prompt_embeds=embeds,
                   output_type="latent", **extra).frames
    torch.testing.assert_close(latents, data["outputs.latents"], **golden.tolerance(case))


# ---------------------------------------------------------------------------------------
# diffusers' caches on our DiT (8 steps: the caches have steps to skip)
# ---------------------------------------------------------------------------------------
CACHE_STEPS = dict(SIZE, num_inference_steps=8)


@pytest.fixture(scope="module")
def embeds(pipe):
    """The prompt encoded once for the cache runs."""
    return dict(zip(("y", "y_mask", "clip_embedding"), pipe._stages().encode_prompt("a red fox in the snow")))


def _cached_run(pipe, embeds, config):
    if config is not None:
        pipe.transformer.enable_cache(config)
    counter = BlockEvaluations(pipe.transformer)
    try:
        latents = _call(pipe, output_type="latent", prompt_embeds=embeds, **CACHE_STEPS).frames
    finally:
        counter.close()
        if config is not None:
            pipe.transformer.disable_cache()
    return latents, counter


@pytest.fixture(scope="module")
def uncached(pipe, embeds):
    return _cached_run(pipe, embeds, None)


@pytest.fixture(scope="module")
def mag_ratios(pipe, embeds):
    """MagCache needs per-step ratios: calibrate them on this model (diffusers' calibrate mode)."""
    run = lambda: _call(pipe, output_type="latent", prompt_embeds=embeds, **CACHE_STEPS)       # noqa: E731
    ratios = calibrate_mag_ratios(pipe.transformer, run, 8)
    assert len(ratios) == 8 and ratios[0] == 1.0
    return ratios


@pytest.mark.parametrize("kind", ["fbc", "taylorseer", "mag"])
def test_cache_reduces_work_and_threshold_zero_changes_nothing(pipe, embeds, uncached, mag_ratios, kind):
    base, full = uncached
    assert (full.blocks, full.attention) == (16, 32)                  # 2 blocks x 8 steps
    if kind == "fbc":
        off, on = FirstBlockCacheConfig(threshold=0.0), FirstBlockCacheConfig(threshold=0.5)
    elif kind == "mag":
        off = MagCacheConfig(threshold=0.0, num_inference_steps=8, mag_ratios=mag_ratios)
        on = MagCacheConfig(threshold=1.0, num_inference_steps=8, mag_ratios=mag_ratios, retention_ratio=0.2)
    else:
        off = TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0)
        on = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1)
    latents, counter = _cached_run(pipe, embeds, off)
    assert torch.equal(latents, base) and counter.attention == full.attention
    latents, counter = _cached_run(pipe, embeds, on)
    assert counter.attention < full.attention and not torch.equal(latents, base)


def test_attention_caches_are_refused_with_the_reason(pipe):
    for config in (PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500), FasterCacheConfig()):
        with pytest.raises(ValueError, match="AttentionModuleMixin"):
            pipe.transformer.enable_cache(config)
    assert not pipe.transformer.is_cache_enabled

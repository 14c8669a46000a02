"""``StepVideoPipeline.__call__(sampling=SamplingConfig)``: one object carries the sampling values,
an explicitly passed keyword argument wins over its field, and without ``sampling`` the
reference defaults apply (golden tiny DiT, latents only)."""
from __future__ import annotations

import pytest
import torch

from stepvideo import FlowMatchDiscreteScheduler
from stepvideo.config import SamplingConfig
from stepvideo.pipelines.pipeline import StepVideoPipeline


@pytest.fixture(scope="module")
def pipe_and_embeds(golden):
    data = golden.data("pipeline_t2v")
    pipe = StepVideoPipeline(golden.dit_model("pipeline_t2v"), FlowMatchDiscreteScheduler())
    embeds = {"y": data["inputs.y"], "y_mask": data["inputs.y_mask"], "clip_embedding": data["inputs.clip_embedding"]}
    return pipe, embeds


def _run(pipe, embeds, **kwargs):
    steps = []
    out = pipe(prompt="p", prompt_embeds=embeds, output_type="latent", progress=False,
               callback=lambda i, t, x: steps.append(float(t)), **kwargs)
    return out, steps


def test_sampling_values_are_used_and_explicit_arguments_win(pipe_and_embeds):
    pipe, embeds = pipe_and_embeds
    sampling = SamplingConfig(num_inference_steps=3, num_frames=17, height=32, width=48, time_shift=5.0, seed=1)
    out, steps = _run(pipe, embeds, sampling=sampling)
    assert out.latents.shape[0:2] == (1, 3) and out.latents.shape[3:] == (2, 3) and len(steps) == 3
    same, _ = _run(pipe, embeds, num_inference_steps=3, num_frames=17, height=32, width=48, time_shift=5.0, seed=1)
    assert torch.equal(same.latents, out.latents)                  # sampling= == the same keyword arguments
    override, steps = _run(pipe, embeds, sampling=sampling, num_inference_steps=2, height=16)
    assert len(steps) == 2 and override.latents.shape[3:] == (1, 3)   # explicit values win, the rest stays
    with pytest.raises(TypeError, match="must be a SamplingConfig"):
        _run(pipe, embeds, sampling={"num_inference_steps": 2})


def test_without_sampling_the_reference_defaults_apply(pipe_and_embeds):
    pipe, embeds = pipe_and_embeds
    _, steps = _run(pipe, embeds, num_frames=17, height=16, width=16, num_inference_steps=2)
    pipe.scheduler.set_timesteps(2, time_shift=13.0)                # the reference default shift
    assert steps == [float(t) for t in pipe.scheduler.timesteps]

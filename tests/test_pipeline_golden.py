"""Replay the golden pipelines (fixed embeddings and noise -> final latents) through the public API."""
import dataclasses

import pytest
import torch

from stepvideo import FlowMatchDiscreteScheduler, StepVideoModel
from stepvideo.config import SamplingConfig
from stepvideo.pipelines.pipeline import StepVideoPipeline


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


@pytest.mark.parametrize("via_sampling", [False, True], ids=["kwargs", "sampling"])
@pytest.mark.parametrize("case", ["pipeline_t2v", "pipeline_ti2v"])
def test_pipeline_matches_golden(golden, case, via_sampling):
    """The reference keyword arguments, and the same values as one ``sampling=SamplingConfig``."""
    spec = golden.case(case)
    data = golden.data(case)
    transformer = golden.dit_model(case)
    pipe = StepVideoPipeline(transformer, FlowMatchDiscreteScheduler(**spec["constructor"]["scheduler_kwargs"]))

    kwargs = dict(spec["call"]["kwargs"])
    for key, value in list(kwargs.items()):
        if isinstance(value, dict) and "tensor" in value:
            kwargs[key] = data[value["tensor"]]
    extra = {}
    if case == "pipeline_ti2v":
        kwargs.pop("first_image")                          # the golden stubbed the VAE encode
        extra["condition_latents"] = data["inputs.first_frame_latent"]
    if via_sampling:
        sampling = SamplingConfig(**{k: kwargs.pop(k) for k in SAMPLING_FIELDS if k in kwargs})
        kwargs["sampling"] = sampling
    embeds = {"y": data["inputs.y"], "y_mask": data["inputs.y_mask"], "clip_embedding": data["inputs.clip_embedding"]}
    steps = []
    out = pipe(**kwargs, prompt_embeds=embeds, callback=lambda i, t, x: steps.append((t.clone(), x.clone())),
               progress=False, **extra)
    tol = golden.tolerance(case)
    (latents,) = out
    torch.testing.assert_close(latents, data["outputs.latents"], **tol)
    assert len(steps) == spec["call"]["kwargs"]["num_inference_steps"]
    for i, (t, x) in enumerate(steps):
        assert float(t) == float(data[f"outputs.step{i}.timestep"][0])
        torch.testing.assert_close(x, data[f"outputs.step{i}.latents_after"], **tol)
    torch.testing.assert_close(pipe.scheduler.sigmas, data["outputs.scheduler_sigmas"], atol=1e-6, rtol=0)


def test_ti2v_condition_layout(golden):
    """Frame 0 = image latent, zeros after, both CFG rows identical, bf16."""
    data = golden.data("pipeline_ti2v")
    spec = golden.case("pipeline_ti2v")
    with torch.device("meta"):
        transformer = StepVideoModel(**spec["constructor"]["transformer_kwargs"])
    pipe = StepVideoPipeline(transformer.to_empty(device="cpu"), FlowMatchDiscreteScheduler())
    cond = pipe.prepare_condition((1, 3, 16, 4, 6), condition_latents=data["inputs.first_frame_latent"])
    assert cond.dtype == torch.bfloat16
    torch.testing.assert_close(cond.float(), data["outputs.condition_hidden_states"], rtol=0, atol=0)

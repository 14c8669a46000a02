"""``--cache``: the spec, the flag in every entry point, nothing changed when off, and the same
skipped steps on gloo ranks (Ulysses, tensor and CFG parallelism) as in one process."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from stepvideo import cli  # noqa: E402
from stepvideo.config import SamplingConfig  # noqa: E402
from stepvideo.models.dit import StepVideoModel  # noqa: E402
from stepvideo.parallel.launch import run_on_cpu_ranks  # noqa: E402
from stepvideo.parallel.parallelize import parallelize_dit  # noqa: E402
from stepvideo.parallel.state import ParallelConfig, ParallelState  # noqa: E402
from stepvideo.perf.cache import BlockEvaluations, CacheSpec, cache_applied, parse_cache  # noqa: E402
from stepvideo.pipelines.pipeline import StepVideoPipeline  # noqa: E402
from stepvideo.schedulers.flow_match_euler import FlowMatchDiscreteScheduler  # noqa: E402
from stepvideo.testing.init import init_random_weights  # noqa: E402
from stepvideo.testing.tiny import TINY  # noqa: E402

STEPS = 8
SPEC = "fbc:0.5"
LAYOUTS = {"ulysses2": dict(ulysses_degree=2), "tensor2": dict(tensor_parallel_degree=2),
           "cfg2": dict(cfg_parallel=True)}


def _model():
    model = StepVideoModel.from_config(TINY.transformer_config("t2v"), attention_backend="sdpa")
    return init_random_weights(model, seed=0).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(2)
    text = 6
    mask = torch.ones(2, 77 + text, dtype=torch.int64)
    mask[1, 77 + 3:] = 0
    embeds = {"y": torch.randn(2, text, TINY.llm_hidden, generator=g), "y_mask": mask,
              "clip_embedding": torch.randn(2, 77, TINY.clip_hidden, generator=g)}
    return embeds, torch.randn(1, 3, TINY.z_channels, 4, 4, generator=g)


def _generate(dit, model, spec, rank=0):
    """One 8-step generation through ``StepVideoPipeline`` with ``spec`` applied as the
    generator applies it; returns (block evaluations, final latents)."""
    embeds, noise = _inputs()
    pipe = StepVideoPipeline(dit, FlowMatchDiscreteScheduler(), rank=rank)
    counter = BlockEvaluations(model)
    with cache_applied(model, spec):
        out = pipe(prompt_embeds=embeds, latents=noise, height=64, width=64, num_frames=17,
                   num_inference_steps=STEPS, output_type="latent", progress=False)
    counter.close()
    return counter.blocks, out.latents


def _rank_worker():
    results = {}
    for name, degrees in LAYOUTS.items():
        state = ParallelState.from_env(ParallelConfig(**degrees))
        model = _model()
        results[name] = _generate(parallelize_dit(model, state), model, SPEC, state.rank)
    return results


@pytest.fixture(scope="module")
def single_model():
    return _model()


@pytest.fixture(scope="module")
def single(single_model):
    """One process: no cache, the hooks in place but never skipping (threshold 0), and SPEC."""
    return {spec: _generate(single_model, single_model, spec) for spec in (None, "fbc:0", SPEC)}


def test_spec_parsing():
    assert parse_cache(None) is None and parse_cache("none") is None and parse_cache("off") is None
    assert parse_cache("fbc:0.03") == CacheSpec("fbc", 0.03) and str(parse_cache("taylorseer:3")) == "taylorseer:3"
    for bad, match in (("fbc", "must be a number"), ("teacache:0.2", "unknown kind"), ("fbc:-1", ">= 0"),
                       ("taylorseer:1.5", "integer")):
        with pytest.raises(ValueError, match=match):
            parse_cache(bad)


def test_flag_reaches_sampling_in_every_entry_point():
    from stepvideo.cli.evaluate import build_parser as eval_parser
    from stepvideo.cli.generate import build_parser as generate_parser

    for parser, argv in ((generate_parser(), ["--prompt", "x"]), (eval_parser(), ["--prompts", "x"])):
        args = parser.parse_known_args(["--cache", "fbc:0.03", *argv])[0]
        assert cli.sampling_config(args, has_image=False).cache == "fbc:0.03"
    assert cli.sampling_from_options({"cache": "taylorseer:2"}).cache == "taylorseer:2"
    with pytest.raises(ValueError, match="unknown kind"):
        cli.sampling_from_options({"cache": "pab:1"})


def test_job_field_is_validated():
    from stepvideo.job_server.config import ServerConfig
    from stepvideo.job_server.requests import ModelInfo, RequestError, build_job

    model = ModelInfo(is_ti2v=False, num_heads=4, parallel=ParallelConfig(), world_size=1)
    job = build_job({"prompt": "x", "cache": "fbc:0.03", "height": 64, "width": 64, "num_frames": 17}, {},
                    model, ServerConfig())
    assert job.sampling.cache == "fbc:0.03" and job.settings()["cache"] == "fbc:0.03"
    with pytest.raises(RequestError, match="cache") as err:
        build_job({"prompt": "x", "cache": "fbc:abc"}, {}, model, ServerConfig())
    assert err.value.status == 422
    assert SamplingConfig().cache is None


def test_off_changes_nothing_bit_for_bit(single):
    blocks, latents = single[None]
    assert blocks == 2 * STEPS
    assert single["fbc:0"][0] == blocks and torch.equal(single["fbc:0"][1], latents)
    cached_blocks, cached = single[SPEC]
    assert cached_blocks < blocks and not torch.equal(cached, latents)


def test_cache_is_removed_after_the_generation(single, single_model):
    """The fixture's last generation used SPEC: no hook is left and the numbers are uncached again."""
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in single_model.modules())
    assert torch.equal(_generate(single_model, single_model, None)[1], single[None][1])


def test_gloo_ranks_skip_the_same_steps_as_one_process(single):
    ranks = run_on_cpu_ranks(_rank_worker, 2, timeout=300)
    blocks, latents = single[SPEC]
    for name in LAYOUTS:
        for rank, results in enumerate(ranks):
            got_blocks, got = results[name]
            assert got_blocks == blocks, f"{name} rank {rank}: {got_blocks} block evaluations, one process {blocks}"
            torch.testing.assert_close(got, latents, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} rank {rank}: {m}")

"""The generation/evaluation command lines: names and aliases, help text, flag rules, guidance <= 1."""
from __future__ import annotations

import pytest
import torch

from stepvideo import cli
from stepvideo.cli.evaluate import build_parser as eval_parser
from stepvideo.cli.generate import build_parser


def test_help_renders_the_example_verbatim():
    text = build_parser("run_parallel.py").format_help()
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if "--ulysses_degree 4 \\" in line)
    assert lines[i].rstrip().endswith("\\") and lines[i + 1].lstrip().startswith("--vae_url")
    assert "--ulysses_degree 4         --vae_url" not in text
    assert "--prompts t2v-eval --save_path" in eval_parser("benchmark/evaluation.py").format_help()


@pytest.mark.parametrize("flag", ["--no_service", "--local_mode", "--local_encoders", "--local"])
def test_one_gpu_flag_spellings(flag):
    assert build_parser().parse_args([flag]).local is True


def test_torchrun_accepts_no_service_but_not_local():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parsed = parser.parse_args(["--nproc_per_node", "1", "run_parallel.py", "--no_service", "--model_dir", "x"])
    assert parsed.training_script_args[0] == "--no_service"
    with pytest.raises(SystemExit):
        parser.parse_args(["--nproc_per_node", "1", "run_parallel.py", "--local"])


def test_degree_and_backend_aliases_reach_the_config():
    old = build_parser().parse_args(["--sp_degree", "2", "--tp_degree", "1", "--parallel_backend", "xfuser"])
    new = build_parser().parse_args(["--ulysses_degree", "2", "--tensor_parallel_degree", "1",
                                     "--sp_backend", "xfuser"])
    assert cli.parallel_config(old, world_size=2) == cli.parallel_config(new, world_size=2)
    config = cli.parallel_config(old, world_size=2)
    assert (config.ulysses_degree, config.sp_backend, config.backend) == (2, "xfuser", "xfuser")
    with pytest.raises(ValueError, match="tensor parallelism"):
        cli.parallel_config(build_parser().parse_args(["--tp_degree", "2", "--sp_backend", "xfuser"]), world_size=2)


def test_compile_and_decode_retries_reach_the_runtime_config():
    runtime = cli.runtime_config(build_parser().parse_args(["--compile", "--decode_retries", "0"]))
    assert runtime.compile is True and runtime.decode_retries == 0


def test_sizes_must_be_multiples_of_16_one_clear_error():
    args = build_parser().parse_args(["--height", "70"])
    with pytest.raises(ValueError, match=r"height 70 is not a multiple of 16.*use 64 or 80"):
        cli.sampling_config(args)


def test_frames_are_rounded_once_by_the_cli(caplog):
    with caplog.at_level("WARNING"):
        sampling = cli.sampling_config(build_parser().parse_args(["--num_frames", "40"]))
    assert sampling.num_frames == 34
    assert [r.getMessage() for r in caplog.records] == ["num_frames 40 is not a multiple of 17; using 34"]


def test_cfg_scale_at_most_one_is_accepted_and_runs_the_conditional_branch_only(tiny_model_dir):
    """guidance <= 1 gives exactly the conditional prediction: the same latents as CFG with an
    unconditional row equal to the conditional one (uncond + g * (cond - uncond) == cond)."""
    from stepvideo.pipelines.pipeline import StepVideoPipeline

    assert cli.sampling_config(build_parser().parse_args(["--cfg_scale", "1"])).guidance_scale == 1.0
    pipe = StepVideoPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    shape = pipe.latent_shape(32, 32, 17)
    gen = torch.Generator().manual_seed(0)
    from stepvideo.testing.tiny import TINY

    y = torch.randn(1, 6, TINY.llm_hidden, generator=gen).repeat(2, 1, 1)
    clip = torch.randn(1, 77, TINY.clip_hidden, generator=gen).repeat(2, 1, 1)
    mask = torch.ones(2, 77 + 6)
    latents = torch.randn(shape, generator=gen)
    calls = []

    def count(*args, **kwargs):
        calls.append(kwargs["hidden_states"].shape[0])

    hook = pipe.transformer.register_forward_pre_hook(lambda mod, args, kwargs: count(*args, **kwargs),
                                                      with_kwargs=True)
    try:
        cond_only = pipe.denoise(latents.clone(), y, mask, clip, 2, 1.0, 13.0, progress=False)
        assert calls == [1, 1]                                          # one row per step
        with_cfg = pipe.denoise(latents.clone(), y, mask, clip, 2, 7.0, 13.0, progress=False)
        assert calls[2:] == [2, 2]
    finally:
        hook.remove()
    torch.testing.assert_close(cond_only, with_cfg, rtol=1e-4, atol=1e-4)

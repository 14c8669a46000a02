"""``stepvideo.perf.compile.compile_blocks`` under Ulysses, tensor and CFG parallelism, and its cache.

One spawn of 2 gloo CPU ranks runs all three layouts (SP2, TP2, CFG2) of a 1-layer tiny fp32 DiT,
eager and compiled, then recompiles one layout from a reset Dynamo to show the warm Inductor cache
is reused. Documented tolerance (docs/performance.md): compiled vs eager, fp32,
max |diff| <= 1e-5 * std(eager output).
"""
import copy
import logging
import os
import subprocess
import sys

import pytest
import torch

from stepvideo.models.dit import StepVideoModel
from stepvideo.parallel.launch import run_on_cpu_ranks
from stepvideo.perf import compile as compile_mod
from stepvideo.testing.init import init_random_weights
from stepvideo.testing.tiny import TINY

LAYOUTS = {"sp2": dict(ulysses_degree=2), "tp2": dict(tensor_parallel_degree=2), "cfg2": dict(cfg_parallel=True)}
FP32_TOL = 1e-5            # in units of std(eager output)


def _model():
    config = {**TINY.transformer_config("t2v"), "num_layers": 1}
    model = StepVideoModel.from_config(config, attention_backend="sdpa")
    return init_random_weights(model, seed=0).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    return dict(hidden_states=torch.randn(2, 2, TINY.z_channels, 4, 4, generator=g),
                encoder_hidden_states=torch.randn(2, 6, TINY.llm_hidden, generator=g),
                encoder_hidden_states_2=torch.randn(2, 4, TINY.clip_hidden, generator=g),
                timestep=torch.tensor([0.7, 0.7]), encoder_attention_mask=mask, return_dict=False)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _worker(cache_dir):
    from torch._dynamo.utils import counters

    from stepvideo.parallel.parallelize import parallelize_dit
    from stepvideo.parallel.state import ParallelConfig, ParallelState
    from stepvideo.perf.compile import compile_blocks

    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1          # no compile-worker pool per rank on a small CPU machine
    handler = _Lines()
    logger = logging.getLogger("stepvideo.perf.compile")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    base, inputs = _model(), _inputs()
    results = {}
    with torch.no_grad():
        for name, degrees in LAYOUTS.items():
            state = ParallelState.from_env(ParallelConfig(**degrees))
            eager = parallelize_dit(copy.deepcopy(base), state)(**inputs)
            compiled_model = compile_blocks(parallelize_dit(copy.deepcopy(base), state), cache_dir=cache_dir)
            results[name] = (eager, compiled_model(**inputs), compiled_model(**inputs))
        results["first_call_logs"] = sum("first call" in line for line in handler.lines)
        # a fresh Dynamo (as in a new process) finds the compiled graphs in the Inductor cache
        torch._dynamo.reset()
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        state = ParallelState.from_env(ParallelConfig(cfg_parallel=True))
        again = compile_blocks(parallelize_dit(copy.deepcopy(base), state), cache_dir=cache_dir)(**inputs)
        results["cache_hits"] = counters["inductor"]["fxgraph_cache_hit"] - hits_before
        results["again"] = again
    return results


@pytest.mark.slow
def test_compiled_blocks_equal_eager_under_sp_tp_cfg(tmp_path):
    ranks = run_on_cpu_ranks(_worker, 2, args=(str(tmp_path / "inductor"),), timeout=900)
    with torch.no_grad():
        single = _model()(**_inputs())
    for rank, res in enumerate(ranks):
        for name in LAYOUTS:
            eager, compiled, compiled_again = res[name]
            scale = float(eager.std())
            torch.testing.assert_close(eager, single, rtol=1e-5, atol=1e-5)          # hooks ran as eager
            diff = float((compiled - eager).abs().max())
            assert diff <= FP32_TOL * scale, f"{name} rank {rank}: max|compiled - eager| {diff:.3g}"
            assert torch.equal(compiled, compiled_again)
        assert res["first_call_logs"] == len(LAYOUTS), "compilation time is logged once per compiled model"
        assert res["cache_hits"] >= 1, "the warm Inductor cache was not reused"
        assert torch.equal(res["again"], res["cfg2"][1])
    assert any(os.scandir(tmp_path / "inductor"))


def test_inductor_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_mod.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_mod.default_cache_dir() == tmp_path / "xdg" / "stepvideo" / "inductor"
    # unset: the default is created and exported
    assert compile_mod.use_inductor_cache() == str(tmp_path / "xdg" / "stepvideo" / "inductor")
    assert os.environ[compile_mod.CACHE_ENV] == str(tmp_path / "xdg" / "stepvideo" / "inductor")
    # the user's TORCHINDUCTOR_CACHE_DIR wins over the default
    monkeypatch.setenv(compile_mod.CACHE_ENV, str(tmp_path / "mine"))
    assert compile_mod.use_inductor_cache() == str(tmp_path / "mine")
    # an explicit directory wins over both
    assert compile_mod.use_inductor_cache(tmp_path / "explicit") == str(tmp_path / "explicit")
    assert (tmp_path / "explicit").is_dir()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_LINE = "compiling 2 DiT blocks on first use"


def _cli_cache_line(model_dir, tmp_path, env) -> str:
    """``run_parallel.py --no_service --compile`` on the tiny model, up to its "compiling ...
    Inductor cache DIR" log line (the compilation itself, about a minute on CPU, is not waited for)."""
    cmd = [sys.executable, os.path.join(REPO, "run_parallel.py"), "--no_service", "--compile", "--model_dir",
           str(model_dir), "--prompt", "x", "--num_frames", "17", "--height", "16", "--width", "16",
           "--infer_steps", "1", "--dtype", "fp32", "--save_path", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if COMPILE_LINE in line:
                return line.split("Inductor cache ", 1)[1].strip()
    finally:
        proc.kill()
        proc.wait()
    raise AssertionError("no compile log line:\n" + "".join(seen[-30:]))


def test_cli_compile_uses_the_documented_cache_unless_the_user_set_one(tiny_model_dir, tmp_path):
    """Through the real CLI, where importing torch._dynamo puts Inductor's /tmp default into
    TORCHINDUCTOR_CACHE_DIR before compile_blocks runs."""
    env = {k: v for k, v in os.environ.items() if k != compile_mod.CACHE_ENV}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    documented = tmp_path / "xdg" / "stepvideo" / "inductor"
    assert _cli_cache_line(tiny_model_dir, tmp_path, env) == str(documented)
    assert documented.is_dir()
    mine = tmp_path / "mine"
    assert _cli_cache_line(tiny_model_dir, tmp_path, {**env, compile_mod.CACHE_ENV: str(mine)}) == str(mine)
    # the library call after a bare `import torch._dynamo` (the repro of the bug)
    code = "import torch._dynamo; from stepvideo.perf.compile import use_inductor_cache; print(use_inductor_cache())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(documented), out.stderr


def test_import_has_no_side_effects(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != compile_mod.CACHE_ENV}
    code = ("import os, stepvideo.perf.compile, stepvideo.models.dit; "
            "assert 'TORCHINDUCTOR_CACHE_DIR' not in os.environ")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path,
                   timeout=120)


def test_compile_blocks_keeps_keys_and_copies(tmp_path, monkeypatch):
    """Compiling rebinds each block's forward only: keys and deepcopy behave (nothing is compiled yet)."""
    monkeypatch.setenv(compile_mod.CACHE_ENV, str(tmp_path))
    model = _model()
    keys = list(model.state_dict())
    compiled = compile_mod.compile_blocks(copy.deepcopy(model))
    assert list(compiled.state_dict()) == keys
    block = compiled.transformer_blocks[0]
    assert "forward" in vars(block) and block.forward.__self__ is block
    twin = copy.deepcopy(compiled)
    assert twin.transformer_blocks[0].forward.__self__ is twin.transformer_blocks[0]
    assert compile_mod.compile_blocks(compiled) is compiled              # idempotent

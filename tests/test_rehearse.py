"""The GPU-run rehearsal (benchmark/rehearse.py, stepvideo/rehearsal/) at the tiny size: the real
generate() on fake CUDA devices, one GPU for every memory profile, SP2 and TP2 ranks; and a
planted CPU tensor in the step loop that the rehearsal must catch, naming the op and the line."""
import sys
from pathlib import Path

import pytest
import torch

from stepvideo.rehearsal.run import Rehearsal, rehearse

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(full=False, height=32, width=32, num_frames=17, steps=1)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rehearsal"))       # one shape-only tiny model for the module


def _passes(result):
    assert result.error is None, result.error
    assert result.audit.mixed() == [], result.audit.grouped("mixed")
    assert result.host_syncs_per_step == 0, result.audit.grouped("sync")
    assert result.audit.steps() == result.config.steps
    assert result.last_line().startswith("rehearsal: ok ")


@pytest.mark.parametrize("profile", ["141g", "80g", "48g", "24g"])
def test_one_gpu_rehearsal_passes_for_every_profile(work_dir, profile):
    result = rehearse(Rehearsal(profile=profile, work_dir=work_dir, **TINY))
    _passes(result)
    assert result.output is not None and Path(result.output).stat().st_size > 0      # the real mp4 writer ran
    assert result.audit.stage_order[0] == "encode" and result.audit.stage_order[-1] == "decode"
    streamed = result.audit.bytes_per_step(result.audit.h2d)
    if profile == "24g":            # every DiT block streams from host memory once per step
        assert streamed > 0
    if profile in ("141g", "80g"):  # nothing streams: only the timestep and the text lengths (bytes)
        assert streamed < 4096
    if profile in ("80g", "48g"):   # the DiT comes to the device only after the encoders left
        events = result.placement
        assert events.index(f"memory profile {profile}: encode: text_encoders -> released") < \
            events.index(f"memory profile {profile}: denoise: dit -> device")


@pytest.mark.parametrize("layout", [dict(nproc=2, rank=1, ulysses_degree=2),
                                    dict(nproc=2, rank=0, ulysses_degree=1, tensor_parallel_degree=2)],
                         ids=["SP2-rank1", "TP2-rank0"])
def test_multi_rank_rehearsal_passes(work_dir, layout):
    result = rehearse(Rehearsal(profile="none", work_dir=work_dir, **layout, **TINY))
    _passes(result)
    assert str(result.audit.device) == f"cuda:{layout['rank']}"


def test_a_cpu_tensor_in_the_step_loop_fails_the_rehearsal_naming_op_and_line(work_dir):
    def plant(module, args, output):          # the bug: a host tensor added to the DiT's output
        if type(module).__name__ == "StepVideoModel":
            return output + torch.ones(output.shape, dtype=output.dtype)    # PLANTED

    handle = torch.nn.modules.module.register_module_forward_hook(plant)
    try:
        result = rehearse(Rehearsal(profile="80g", work_dir=work_dir, **{**TINY, "steps": 2}))
    finally:
        handle.remove()
    assert result.last_line().startswith("rehearsal: FAIL ")
    assert "mixed_device_ops=2 " in result.last_line()                     # once per step, both listed
    [(text, count)] = result.audit.grouped("mixed")
    line = next(i for i, l in enumerate(Path(__file__).read_text().splitlines(), 1) if "# PLANTED" in l)
    assert text.startswith(f"aten.add at tests/test_rehearse.py:{line} (plant) [denoise]"), text


def test_the_command_prints_the_last_line(work_dir):
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "benchmark" / "rehearse.py"), "--profile", "48g", "--tiny",
                          "--height", "32", "--width", "32", "--num_frames", "17", "--steps", "1",
                          "--work_dir", work_dir], capture_output=True, text=True, timeout=300)
    last = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert last.startswith("rehearsal: ok peak_gib=") and " budget_gib=44.5 mixed_device_ops=0 " \
        "host_syncs_per_step=0 h2d_gib_per_step=" in last, last

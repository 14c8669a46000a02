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
    assert result.audit.most_syncs_in_a_step() == 0, result.audit.grouped("sync")
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
                                    dict(nproc=2, rank=0, ulysses_degree=1, tensor_parallel_degree=2),
                                    dict(nproc=2, rank=0, ulysses_degree=2, no_service=True)],
                         ids=["SP2-rank1", "TP2-rank0-service-elsewhere", "SP2-rank0-no-service"])
def test_multi_rank_rehearsal_passes(work_dir, layout):
    result = rehearse(Rehearsal(profile="none", work_dir=work_dir, **layout, **TINY))
    _passes(result)
    assert str(result.audit.device) == f"cuda:{layout['rank']}"
    if layout["rank"] == 0:            # rank 0 writes the mp4 (of the stand-in service's zero video, or its own)
        assert result.output is not None and Path(result.output).stat().st_size > 0
        # with the service elsewhere nothing encodes or decodes on this rank's device
        assert ("encode" in result.audit.stage_order) == bool(layout.get("no_service"))


def test_rank0_without_a_service_parks_its_dit_while_it_encodes_and_decodes(work_dir):
    """``--no_service`` on several 80 GB ranks: rank 0 encodes and decodes on top of its DiT share.
    Its first full-size rehearsal (SP4) peaked at 96.5 GiB while encoding; with ``auto`` its share
    now waits on the host meanwhile, as the 80g profile does for one GPU, and the other ranks keep
    theirs."""
    layout = dict(nproc=2, ulysses_degree=2, no_service=True)
    rank0 = rehearse(Rehearsal(profile="auto", rank=0, work_dir=work_dir, **layout, **TINY))
    _passes(rank0)
    events = rank0.placement
    assert "memory profile auto (rank 0 parks its DiT): encode: text_encoders -> released" in events, events
    assert events.index("memory profile auto (rank 0 parks its DiT): encode: text_encoders -> released") < \
        events.index("memory profile auto (rank 0 parks its DiT): denoise: dit -> device") < \
        events.index("memory profile auto (rank 0 parks its DiT): decode: dit -> host")
    rank1 = rehearse(Rehearsal(profile="auto", rank=1, work_dir=work_dir, **layout, **TINY))
    _passes(rank1)
    assert rank1.placement == ["memory profile none: load: dit -> device"], rank1.placement


def test_the_service_rehearsal_passes_and_agrees_with_the_cost_model(work_dir):
    """The service's requests of a TI2V generation on its own fake device: caption, image encode,
    decode; each VAE request's device bytes beyond the weights within 3% of cost.py's trace."""
    from stepvideo.caption_service.cost import RUNTIME_OVERHEAD_BYTES
    from stepvideo.rehearsal.service import ServiceRehearsal, rehearse_service

    result = rehearse_service(ServiceRehearsal(mode="ti2v", full=False, height=32, width=32, num_frames=17,
                                               work_dir=work_dir))
    assert result.error is None, result.error
    assert result.ok and result.last_line().startswith("rehearsal: ok "), result.last_line()
    assert set(result.request_peaks) == {"caption", "image encode", "decode"}
    assert result.refusals == [] and result.budget > 0
    for name in ("image encode", "decode"):
        traced = result.predicted[name] - RUNTIME_OVERHEAD_BYTES
        assert abs(traced - result.request_extra[name]) <= 0.03 * result.request_extra[name], result.comparison()
    answers = result.answers        # what the stand-in service will answer rank 0
    assert answers.caption["y_mask"].shape == (2, 397) and answers.video.shape == (1, 17, 3, 32, 32)
    assert answers.latents.shape[:2] == (1, 1)


def test_fused_cuda_attention_needs_stride_one_last_dims():
    """PyTorch's CUDA SDPA runs a fused kernel only when q, k and v have stride 1 in their last
    dimension; the VAE's attention on a transposed view runs the math path and its L x L scores.
    The rehearsal's answer must do the same (it once picked flash: 0.75 GiB missing per chunk)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from stepvideo.caption_service.cost import LiveBytesTracker
    from stepvideo.rehearsal.fake_cuda import CudaTensorPython

    length, width = 512, 64
    with FakeTensorMode(allow_non_fake_inputs=True), CudaTensorPython():
        dense = torch.empty(1, 1, length, width, dtype=torch.bfloat16, device="cuda:0")
        strided = torch.empty(1, width, length, dtype=torch.bfloat16, device="cuda:0").transpose(1, 2).unsqueeze(1)
        peaks = {}
        for name, q in (("dense", dense), ("strided", strided)):
            with LiveBytesTracker() as tracker:
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            peaks[name] = tracker.peak
    scores = length * length * 2
    assert peaks["dense"] < scores <= peaks["strided"], peaks


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


def test_a_failing_multi_rank_rehearsal_reports_instead_of_ending_the_process(tmp_path):
    """A failed multi-rank run leaves its process at once (``process.exit_now``: a broken NCCL
    group must not be torn down). A rehearsal must say FAIL with the rank's line and return: its
    ``fake`` group cannot break, and the caller (this test process) must live on."""
    def fail(module, args, output):
        if type(module).__name__ == "StepVideoModel":
            raise RuntimeError("planted failure in the DiT")

    handle = torch.nn.modules.module.register_module_forward_hook(fail)
    try:
        result = rehearse(Rehearsal(profile="none", nproc=2, rank=1, ulysses_degree=2, work_dir=str(tmp_path),
                                    **TINY))
    finally:
        handle.remove()
    assert result.last_line().startswith("rehearsal: FAIL ")
    assert result.error == "RankFailure: RuntimeError: planted failure in the DiT", result.error

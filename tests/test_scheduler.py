"""FlowMatchDiscreteScheduler against the golden schedules and Euler steps."""
import pytest
import torch

from stepvideo import FlowMatchDiscreteScheduler


def test_set_timesteps_matches_golden(golden):
    case = golden.case("scheduler")
    data = golden.data("scheduler")
    tol = golden.tolerance("scheduler")
    checked = 0
    for entry in case["set_timesteps_cases"]:
        sched = FlowMatchDiscreteScheduler(**entry["constructor_kwargs"])
        sched.set_timesteps(**entry["call"]["kwargs"])
        for name in entry["outputs"]:
            got = sched.sigmas if name.endswith(".sigmas") else sched.timesteps
            torch.testing.assert_close(got, data[name], **tol)
            checked += 1
    assert checked >= 20


def test_step_matches_golden(golden):
    case = golden.case("scheduler")
    data = golden.data("scheduler")
    for entry in case["step_cases"]:
        sched = FlowMatchDiscreteScheduler(**entry["constructor_kwargs"])
        sched.set_timesteps(**entry["setup_kwargs"])
        t = sched.timesteps[entry["timestep_index"]]
        prev = sched.step(data["inputs.step.model_output"], t, data["inputs.step.sample"])
        assert sched.step_index == entry["timestep_index"] + 1
        torch.testing.assert_close(prev, data[entry["output"]], **golden.tolerance("scheduler"))


def test_spec_sigma_values():
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(50, time_shift=13.0)
    expected = torch.tensor([0, 0.00156742, 0.00319487, 0.00488597, 0.00664449, 0.00847453])
    torch.testing.assert_close(sched.sigmas[:6], expected, atol=1e-7, rtol=0)
    assert sched.sigmas[0] == 0 and sched.sigmas[-1] == 1
    assert len(sched.timesteps) == 50 and torch.all(sched.sigmas[1:] > sched.sigmas[:-1])


def test_step_is_fp32_and_advances():
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(3, time_shift=7.0)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    v = torch.full((1, 2), 2.0, dtype=torch.bfloat16)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(v, t, x)
        assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((1, 2), 3.0))   # 1 + 2 * (1 - 0)
    with pytest.raises(RuntimeError, match="called 4 times"):
        sched.step(v, sched.timesteps[0], x)


def test_misuse_errors():
    sched = FlowMatchDiscreteScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1), torch.tensor(0.0), torch.zeros(1))
    sched.set_timesteps(5, time_shift=13.0)
    with pytest.raises(ValueError, match="enumerate"):
        sched.step(torch.zeros(1), 0, torch.zeros(1))
    with pytest.raises(ValueError, match="not one of"):
        sched.step(torch.zeros(1), torch.tensor(0.123), torch.zeros(1))
    with pytest.raises(ValueError, match="solver"):
        FlowMatchDiscreteScheduler(solver="heun")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)

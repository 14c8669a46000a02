"""``StageTimer``: the per-stage timings and the one-line summary every run prints, and the
settings a server job gets from the CLI's own sampling code."""
import pytest

from stepvideo import cli
from stepvideo.config import get_preset
from stepvideo.evaluation.runner import make_record
from stepvideo.evaluation.sets import EvalItem
from stepvideo.timing import StageTimer


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stage_timer_seconds_events_and_summary():
    clock, events = FakeClock(), []
    timer = StageTimer(listener=lambda *e: events.append(e), clock=clock)
    timer.begin("encoding")
    clock.now += 0.5
    timer.begin("denoising", total_steps=2)
    for i, dt in enumerate((0.25, 0.75)):
        clock.now += dt
        timer.step(i)
    timer.begin("decoding")
    clock.now += 2.0
    timer.begin("writing")
    clock.now += 0.125
    timer.finish()
    assert events == [("encoding", 0, 0), ("denoising", 0, 2), ("denoising", 1, 2), ("denoising", 2, 2),
                      ("decoding", 2, 2), ("writing", 2, 2)]
    out = timer.as_dict()
    assert out["steps_s"] == [0.25, 0.75] and out["denoise_s"] == 1.0 and out["total_s"] == 3.625
    assert out["summary"] == ("timing: encode 0.50 s | denoise 1.00 s (2 steps, 0.500 s/step) | decode 2.00 s | "
                              "write 0.12 s | total 3.62 s")
    with pytest.raises(ValueError, match="stage must be one of"):
        timer.begin("sleeping")


def test_manifest_records_carry_the_summary():
    item = EvalItem(index=1, id="a", category="c", prompt="p", seed=1)
    record = make_record(item, get_preset("t2v"), {}, "ok", timings={"summary": "timing: encode 1.00 s"})
    assert record["timing"] == "timing: encode 1.00 s"


def test_sampling_from_options_is_the_cli_path():
    parser = __import__("argparse").ArgumentParser()
    cli.add_sampling_args(parser)
    args = parser.parse_args(["--preset", "t2v-turbo", "--infer_steps", "3", "--cfg_scale", "4"])
    from_flags = cli.sampling_config(args)
    from_dict = cli.sampling_from_options({"preset": "t2v-turbo", "num_inference_steps": 3, "guidance_scale": 4})
    assert from_flags == from_dict and from_dict.time_shift == 17.0 and isinstance(from_dict.guidance_scale, float)
    with pytest.raises(ValueError, match="num_frames must be an integer"):
        cli.sampling_from_options({"num_frames": 17.5})
    with pytest.raises(ValueError, match="unknown sampling option"):
        cli.sampling_from_options({"steps": 3})
    assert cli.sampling_from_options({}, has_image=True) == get_preset("ti2v")

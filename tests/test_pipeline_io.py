"""Pipeline input checks, TI2V image preparation, post-processing and output naming."""
import warnings

import numpy as np
import pytest
import torch

from stepvideo.config import PRESETS, SamplingConfig
from stepvideo.io.image import load_first_image, prepare_first_image, resize_to_desired_aspect_ratio
from stepvideo.io.video import crop_540p, output_video_path, read_mp4, slugify, write_mp4
from stepvideo.pipelines.pipeline import StepVideoPipeline
from stepvideo.io.frames import decoded_to_frames


def test_check_inputs_rounds_with_warnings_and_rejects_small_values():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StepVideoPipeline.check_inputs(544, 992, 204) == (544, 992, 204)
    with pytest.warns(UserWarning, match="multiple of 17"):
        assert StepVideoPipeline.check_inputs(544, 992, 100)[2] == 85
    with pytest.warns(UserWarning, match="multiples of 16"):
        assert StepVideoPipeline.check_inputs(550, 1000, 17)[:2] == (544, 992)
    for bad in [dict(height=8, width=64, num_frames=17), dict(height=64, width=64, num_frames=16)]:
        with pytest.raises(ValueError, match="must be an int >="):
            StepVideoPipeline.check_inputs(**bad)


def test_presets_and_explicit_overrides():
    assert (PRESETS["t2v-turbo"].num_inference_steps, PRESETS["t2v-turbo"].guidance_scale,
            PRESETS["t2v-turbo"].time_shift) == (15, 5.0, 17.0)
    ti2v = PRESETS["ti2v"]
    assert (ti2v.time_shift, ti2v.motion_score, ti2v.num_frames) == (12.573, 5.0, 102)
    assert not ti2v.neg_magic.endswith("。") and PRESETS["t2v"].neg_magic.endswith("。")
    assert ti2v.with_overrides(time_shift=13.0, num_frames=None).time_shift == 13.0
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingConfig(guidance_scale=-1.0)
    assert SamplingConfig(guidance_scale=1.0).guidance_scale == 1.0      # <= 1: conditional branch only


def test_image_aspect_bucket_resize_and_crop():
    image = torch.linspace(-1, 1, 3 * 90 * 200).reshape(3, 90, 200)
    out = resize_to_desired_aspect_ratio(image, 64, 96)
    assert out.shape == (1, 3, 64, 96)
    # wider than the target: scale by height (64/90), width round(200*64/90)=142, centre crop cols 23..119
    expected = torch.nn.functional.interpolate(image[None], size=(64, 142), mode="bilinear", antialias=True,
                                               align_corners=False)[:, :, :, 23:119]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert prepare_first_image(image, 64, 96).shape == (1, 1, 3, 64, 96)


def test_load_first_image_from_pil_and_path(tmp_path):
    from PIL import Image

    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = [255, 0, 51]
    Image.fromarray(pixels).save(tmp_path / "img.png")
    t = load_first_image(tmp_path / "img.png")
    assert t.shape == (3, 4, 6)
    assert t[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 51 / 255 * 2 - 1])
    assert torch.equal(load_first_image(Image.fromarray(pixels)), t)
    with pytest.raises(FileNotFoundError, match="first image not found"):
        load_first_image(tmp_path / "missing.png")


def test_postprocess_bf16_arithmetic_batch_stacking_and_crop():
    video = torch.tensor([-2.0, -1.0, 0.0, 0.3, 1.0]).view(1, 1, 1, 1, 5).expand(2, 3, 3, 4, 5).clone()
    video[1] *= -1
    frames = decoded_to_frames(video, crop_540p=True)
    assert frames.shape == (3, 8, 5, 3) and frames.dtype == np.uint8     # batch stacked along height
    # (clamp(v)+1)*127.5 in bf16 then truncation: 0.3 -> bf16(1.3)=1.296875 -> 165.3515625 -> bf16 165.0 -> 165
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 165, 255]
    assert frames[0, 4, :, 0].tolist() == [255, 255, 127, 89, 0]
    big = np.zeros((2, 544, 992, 3), np.uint8)
    assert crop_540p(big).shape == (2, 540, 960, 3)
    assert crop_540p(np.zeros((1, 992, 544, 3), np.uint8)).shape == (1, 960, 540, 3)
    assert crop_540p(np.zeros((1, 64, 96, 3), np.uint8)).shape == (1, 64, 96, 3)   # smaller: skipped


def test_output_names_are_safe_unique_and_atomic(tmp_path):
    assert slugify("a/b: c*d?") == "a_b_c_d"
    assert slugify("一名宇航员/在月球上") == "一名宇航员_在月球上"
    first = output_video_path(tmp_path, "a cat / dog", seed=3)
    assert first.name == "a_cat_dog-seed3.mp4"
    frames = np.full((17, 32, 48, 3), 128, np.uint8)
    write_mp4(first, frames)
    second = output_video_path(tmp_path, "a cat / dog", seed=3)
    assert second.name == "a_cat_dog-seed3-1.mp4"
    explicit = tmp_path / "sub" / "given.mp4"
    assert output_video_path(tmp_path, "x", output_path=explicit) == explicit
    back, meta = read_mp4(first)
    assert back.shape == (17, 32, 48, 3) and abs(int(back.mean()) - 128) <= 2
    assert [p.name for p in tmp_path.iterdir()] == ["a_cat_dog-seed3.mp4"]
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "bad.mp4", frames.astype(np.float32))
    assert not (tmp_path / "bad.mp4").exists()

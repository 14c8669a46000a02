"""First-image pre-flight: pixel formats converted or refused, small or off-aspect images noted.

Unit level (``stepvideo.io.image.to_rgb`` / ``describe_fit``, ``stepvideo.runtime.preflight.check_first_image``)
plus one real CLI run for a refused image; the warning on a real 2-rank run is in
tests/test_end_to_end.py::test_ti2v_two_ranks_with_an_image.
"""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepvideo.errors import PreflightError
from stepvideo.io.image import describe_fit, load_first_image, to_rgb
from stepvideo.runtime.preflight import check_first_image

REPO = Path(__file__).resolve().parents[1]
_YY, _XX = np.mgrid[0:32, 0:48]
GRADIENT = np.stack([_XX * 5, _YY * 7, np.full((32, 48), 90)], -1).astype(np.uint8)       # [32, 48, 3]


def _warnings(caplog, path, height=32, width=48):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stepvideo.runtime.preflight"):
        check_first_image(path, height, width)
    return [r.getMessage() for r in caplog.records]


def test_rgb_images_load_as_before(tmp_path):
    """The reference's arithmetic for plain RGB: pixel/255*2-1, no note."""
    Image.fromarray(GRADIENT).save(tmp_path / "rgb.png")
    image, note = to_rgb(Image.open(tmp_path / "rgb.png"))
    assert note is None and np.array_equal(np.asarray(image), GRADIENT)
    expected = torch.from_numpy(GRADIENT).permute(2, 0, 1).float() / 255.0 * 2 - 1
    assert torch.equal(load_first_image(tmp_path / "rgb.png"), expected)


def test_palette_and_grey_convert_exactly_without_a_warning(tmp_path, caplog):
    palette = Image.fromarray(GRADIENT).quantize(colors=64)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image, note = to_rgb(Image.open(tmp_path / "p.png"))
    assert note is None and np.array_equal(np.asarray(image), np.asarray(palette.convert("RGB")))
    Image.fromarray(GRADIENT[..., 0]).save(tmp_path / "grey.png")
    assert _warnings(caplog, tmp_path / "p.png") == _warnings(caplog, tmp_path / "grey.png") == []


def test_alpha_is_dropped_like_the_reference_and_noted(tmp_path, caplog):
    rgba = np.concatenate([GRADIENT, np.full((32, 48, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert _warnings(caplog, tmp_path / "opaque.png") == []            # fully opaque: nothing to say
    rgba[:8, :, 3] = 0                                                   # the top quarter transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    image, _ = to_rgb(Image.open(tmp_path / "alpha.png"))
    assert np.array_equal(np.asarray(image), GRADIENT)                  # the colours under the alpha
    (line,) = _warnings(caplog, tmp_path / "alpha.png")
    assert "alpha.png' is RGBA with transparent pixels (25% of the image)" in line


def test_cmyk_is_converted_with_a_note(tmp_path, caplog):
    cmyk = Image.fromarray(GRADIENT).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    image, _ = to_rgb(Image.open(tmp_path / "cmyk.jpg"))
    assert image.mode == "RGB" and np.abs(np.asarray(image).astype(int) - GRADIENT).mean() < 8
    (line,) = _warnings(caplog, tmp_path / "cmyk.jpg")
    assert "is CMYK: converted to RGB" in line


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, caplog):
    grey16 = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)          # 0 .. 61400
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    image, _ = to_rgb(Image.open(tmp_path / "g16.png"))
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], np.round(grey16 / 257).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 239                     # convert("RGB") gives 255 almost everywhere
    (line,) = _warnings(caplog, tmp_path / "g16.png")
    assert "16-bit greyscale: scaled to 8 bits" in line


def test_float_pixels_are_refused_with_the_reason(tmp_path):
    Image.fromarray(np.full((32, 48), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(PreflightError, match=r"float.tiff' has 'F' pixels .* save it as an 8-bit RGB"):
        check_first_image(tmp_path / "float.tiff", 32, 48)
    with pytest.raises(ValueError, match="'F' pixels"):
        load_first_image(tmp_path / "float.tiff")


def test_fit_notes_for_small_and_off_aspect_images():
    assert describe_fit(992, 544, 544, 992) is None                      # native
    assert describe_fit(1920, 1080, 544, 992) is None                    # 16:9: a 2% crop, no note
    assert describe_fit(1280, 960, 544, 992) == ("1280x960 has aspect ratio 1.33, the target 992x544 has 1.82: "
                                                 "resized to 992x744 and centre-cropped to 992x544, cutting 27% "
                                                 "of its height")
    assert describe_fit(496, 272, 544, 992) == ("496x272 is too small to cover the 992x544 target: upscaled 2.00x "
                                               "to 992x544 (a softer first frame) and centre-cropped to 992x544")
    portrait = describe_fit(544, 992, 544, 992)                           # a portrait image, landscape target
    assert "upscaled 1.82x to 992x1809" in portrait and "cutting 70% of its height" in portrait


def test_cli_refuses_a_float_image_in_one_line(tiny_ti2v_model_dir, tmp_path):
    Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(tmp_path / "float.tiff")
    res = subprocess.run([sys.executable, str(REPO / "run_parallel.py"), "--no_service", "--model_dir",
                          str(tiny_ti2v_model_dir), "--prompt", "x", "--first_image_path", str(tmp_path / "float.tiff"),
                          "--height", "64", "--width", "64", "--infer_steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "'F' pixels" in errors[0] and "Traceback" not in res.stderr

"""TI2V first-image preparation, following the reference's arithmetic.

``load_first_image`` gives ``[3, H0, W0]`` float32 in [-1, 1] (``pixel/255 * 2 - 1``).
``resize_to_desired_aspect_ratio`` scales so the image covers ``(height, width)`` with the
reference's rounding (Python ``round``, ties to even), resizes with
``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``
(what the reference's torchvision ``Resize`` computes on tensors) and centre-crops.

Pixel formats (:func:`to_rgb`): RGB, grey, bilevel, YCbCr and palette images convert exactly;
the rest as below, each with a one-line note that the CLI's pre-flight prints
(``stepvideo.runtime.preflight.check_first_image``):

* alpha (RGBA, LA, PA, a palette with a transparent colour): the alpha channel is dropped, as
  the reference does (``convert("RGB")``), so transparent pixels show the colour stored under
  them; noted when any pixel is not opaque;
* CMYK: Pillow's plain CMYK -> RGB formula (the reference's), no colour management; noted;
* 16-bit grey (``I;16*``): scaled to 8 bits (``round(v / 257)``); noted. (The reference's
  ``convert("RGB")`` clips such images to white.)
* 32-bit integer or float pixels (``I``, ``F``) and other modes: refused (``ValueError``), as
  their value range is not defined.

Size (:func:`describe_fit`): an image smaller than the target is upscaled (noted), one whose
aspect ratio is far from the target's is centre-cropped (noted when more than
:data:`CROP_NOTE_FRACTION` of it is cut). Numbers for RGB images are those of the reference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


EXACT_MODES = ("RGB", "L", "1", "YCbCr")          # convert("RGB") keeps every value
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
CROP_NOTE_FRACTION = 0.10        # a cover-resize that cuts more than this share of the image is noted


def to_rgb(image) -> Tuple["Image.Image", Optional[str]]:
    """A PIL image in any supported mode -> ``(RGB image, note or None)``; see the module docstring.

    Raises ``ValueError`` (naming the mode and the fix) for a mode with no defined conversion.
    """
    mode = image.mode
    if mode in EXACT_MODES or (mode == "P" and "transparency" not in image.info):
        return image.convert("RGB"), None
    if mode in ALPHA_MODES or mode == "P":
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        see_through = float((alpha < 255).mean())
        note = None if see_through == 0 else (
            f"is {mode} with transparent pixels ({see_through:.0%} of the image): the alpha channel is dropped, so they show "
            "the colour stored under them; flatten it onto the background you want first")
        return image.convert("RGB"), note
    if mode == "CMYK":
        return image.convert("RGB"), ("is CMYK: converted to RGB with Pillow's plain formula (no colour "
                                      "management), colours may differ; save it as RGB for exact colours")
    if mode in SIXTEEN_BIT_MODES:
        from PIL import Image   # optional image dependency, only for image inputs

        grey = np.asarray(image, dtype=np.float64)                            # [H0, W0] in 0..65535
        eight = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB"), "is 16-bit greyscale: scaled to 8 bits"
    raise ValueError(f"has {mode!r} pixels (32-bit integer/float or an unusual colour space) with no defined "
                     "conversion to RGB; save it as an 8-bit RGB PNG or JPEG")


def cover_size(h0: int, w0: int, height: int, width: int) -> Tuple[int, int]:
    """The ``(hs, ws)`` an ``h0 x w0`` image is resized to so that it covers ``height x width``
    (the reference's rounding); :func:`resize_to_desired_aspect_ratio` then centre-crops."""
    scale = width / w0 if w0 / h0 < width / height else height / h0
    return int(round(h0 * scale)), int(round(w0 * scale))


def describe_fit(w0: int, h0: int, height: int, width: int) -> Optional[str]:
    """One sentence on how a ``w0 x h0`` image is fitted to ``width x height`` when it is
    upscaled or loses more than :data:`CROP_NOTE_FRACTION` to the crop; None otherwise."""
    hs, ws = cover_size(h0, w0, height, width)
    lost = 1 - (height * width) / (hs * ws)
    upscaled = hs > h0
    if not upscaled and lost <= CROP_NOTE_FRACTION:
        return None
    side = "height" if hs > height else "width"
    crop = f"centre-cropped to {width}x{height}" + (f", cutting {lost:.0%} of its {side}" if lost > 0.005 else "")
    if upscaled:
        how = (f"is too small to cover the {width}x{height} target: upscaled {hs / h0:.2f}x to {ws}x{hs} "
               "(a softer first frame)")
    else:
        how = (f"has aspect ratio {w0 / h0:.2f}, the target {width}x{height} has {width / height:.2f}: "
               f"resized to {ws}x{hs}")
    return f"{w0}x{h0} {how} and {crop}"


def load_first_image(first_image) -> torch.Tensor:
    """A path, PIL image or tensor -> ``[3, H0, W0]`` float32 in [-1, 1].

    Tensors are used as they are (expected ``[3, H0, W0]`` in [-1, 1]).
    """
    if torch.is_tensor(first_image):
        if first_image.ndim != 3 or first_image.shape[0] != 3:
            raise ValueError(f"first_image tensor must be [3, H, W] in [-1, 1], got {list(first_image.shape)}")
        return first_image.float()
    from PIL import Image

    if isinstance(first_image, (str, os.PathLike)):
        path = Path(first_image)
        if not path.is_file():
            raise FileNotFoundError(f"first image not found: {path}")
        with Image.open(path) as img:
            image, _ = to_rgb(img)
    elif isinstance(first_image, Image.Image):
        image, _ = to_rgb(first_image)
    else:
        raise TypeError(f"first_image must be a path, a PIL image or a tensor, got {type(first_image).__name__}")
    array = np.asarray(image, dtype=np.uint8)                               # [H0, W0, 3]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    return tensor * 2 - 1


def resize_to_desired_aspect_ratio(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, H0, W0]`` -> ``[1, 3, height, width]``: cover-resize then centre crop."""
    _, h0, w0 = image.shape
    hs, ws = cover_size(h0, w0, height, width)
    if hs < height or ws < width:
        raise ValueError(f"resized image {hs}x{ws} does not cover {height}x{width}")
    resized = F.interpolate(image[None].float(), size=(hs, ws), mode="bilinear", antialias=True,
                            align_corners=False)
    top, left = (hs - height) // 2, (ws - width) // 2
    return resized[:, :, top: top + height, left: left + width]


def prepare_first_image(first_image, height: int, width: int) -> torch.Tensor:
    """The VAE-encoder input for TI2V: ``[1, 1, 3, height, width]`` = (B, T, C, H, W)."""
    return resize_to_desired_aspect_ratio(load_first_image(first_image), height, width)[:, None]

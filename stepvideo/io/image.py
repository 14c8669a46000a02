"""TI2V first-image preparation, following the reference's arithmetic.

``load_first_image`` gives ``[3, H0, W0]`` float32 in [-1, 1] (``pixel/255 * 2 - 1``).
``resize_to_desired_aspect_ratio`` scales so the image covers ``(height, width)`` with the
reference's rounding (Python ``round``, ties to even), resizes with
``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``
(what the reference's torchvision ``Resize`` computes on tensors) and centre-crops.
"""
from __future__ import annotations

import os
from pathlib import Path


import numpy as np
import torch
import torch.nn.functional as F


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
            image = img.convert("RGB")
    elif isinstance(first_image, Image.Image):
        image = first_image.convert("RGB")
    else:
        raise TypeError(f"first_image must be a path, a PIL image or a tensor, got {type(first_image).__name__}")
    array = np.asarray(image, dtype=np.uint8)                               # [H0, W0, 3]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    return tensor * 2 - 1


def resize_to_desired_aspect_ratio(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, H0, W0]`` -> ``[1, 3, height, width]``: cover-resize then centre crop."""
    _, h0, w0 = image.shape
    target_ratio, ratio = width / height, w0 / h0
    scale = width / w0 if ratio < target_ratio else height / h0
    ws, hs = int(round(w0 * scale)), int(round(h0 * scale))
    if hs < height or ws < width:
        raise ValueError(f"resized image {hs}x{ws} does not cover {height}x{width}")
    resized = F.interpolate(image[None].float(), size=(hs, ws), mode="bilinear", antialias=True,
                            align_corners=False)
    top, left = (hs - height) // 2, (ws - width) // 2
    return resized[:, :, top: top + height, left: left + width]


def prepare_first_image(first_image, height: int, width: int) -> torch.Tensor:
    """The VAE-encoder input for TI2V: ``[1, 1, 3, height, width]`` = (B, T, C, H, W)."""
    return resize_to_desired_aspect_ratio(load_first_image(first_image), height, width)[:, None]

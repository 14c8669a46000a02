"""The first frame of a job's mp4 as a JPEG or WebP (``GET /v1/videos/<id>/content?variant=thumbnail``)."""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np

FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def first_frame_image(path: Union[str, os.PathLike], fmt: str = "jpeg") -> bytes:
    """Decode only the first frame of ``path`` (``uint8 [H, W, 3]``) and encode it as ``fmt``."""
    import imageio_ffmpeg      # heavy; only thumbnail requests need them
    from PIL import Image

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        width, height = meta["size"]
        frame = np.frombuffer(next(reader), dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=FORMATS[fmt][0], quality=95)
    return buf.getvalue()

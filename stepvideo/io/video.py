"""mp4 writing and reading, the reference's 540p crop, and safe output file names.

Frames are ``uint8 [T, H, W, 3]`` (numpy or torch). Writing uses imageio-ffmpeg's bundled
ffmpeg with libx264 at 25 fps, ``yuv420p`` and the reference's temporal denoise filter
(``atadenoise``). Files are written to a temporary name in the target folder and renamed
into place, so a crash never leaves a truncated video under the final name.
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

ATADENOISE = "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"
DEFAULT_FPS = 25


def crop_540p(frames: np.ndarray) -> np.ndarray:
    """The reference's centre crop to 540x960 (landscape) or 960x540 (portrait).

    ``frames [T, H, W, 3]``. Frames smaller than the crop are returned unchanged (the
    reference's slicing would give odd results there; we skip it and document it).
    """
    _, h, w, _ = frames.shape
    hc, wc = h // 2, w // 2
    if wc > hc:
        crop_h, crop_w = 540, 960
    elif wc < hc:
        crop_h, crop_w = 960, 540
    else:
        return frames
    if h < crop_h or w < crop_w:
        return frames
    return frames[:, hc - crop_h // 2: hc + crop_h // 2, wc - crop_w // 2: wc + crop_w // 2]


def _as_numpy_uint8(frames) -> np.ndarray:
    if hasattr(frames, "numpy"):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return np.ascontiguousarray(frames)


def write_mp4(path: Union[str, os.PathLike], frames, fps: int = DEFAULT_FPS, denoise: bool = True,
              quality: int = 5) -> Path:
    """Write ``frames`` to ``path`` atomically (temporary file + rename) and return the path."""
    import imageio_ffmpeg

    frames = _as_numpy_uint8(frames)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix or '.mp4'}")
    params = ["-vf", ATADENOISE] if denoise else []
    try:
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", quality=quality,
                                             pix_fmt_out="yuv420p", macro_block_size=2, output_params=params,
                                             ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_mp4(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, dict]:
    """Read a video back as ``uint8 [T, H, W, 3]`` plus ffmpeg's metadata (fps, size, ...)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), meta


_UNSAFE = re.compile(r"[^\w\-.]+", flags=re.UNICODE)


def slugify(text: str, max_chars: int = 50) -> str:
    """A file-name-safe slug of ``text``: keeps letters (CJK included), digits, '-', '_', '.'."""
    text = unicodedata.normalize("NFKC", text).strip()
    slug = _UNSAFE.sub("_", text).strip("._")[:max_chars].strip("._")
    return slug or "video"


def unique_path(folder: Union[str, os.PathLike], stem: str, suffix: str = ".mp4") -> Path:
    """``folder/stem.mp4``, or ``stem-1.mp4``, ``stem-2.mp4`` ... if taken: never overwrites."""
    folder = Path(folder)
    candidate = folder / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{suffix}"
        n += 1
    return candidate


def output_video_path(save_path: Union[str, os.PathLike], prompt: str, seed: Optional[int] = None,
                      output_file_name: str = "", name_suffix: str = "",
                      output_path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Decide the mp4 path.

    An explicit ``output_path`` is honoured as given (it may overwrite). Otherwise the name is
    ``<output_file_name or slug(prompt)>[-seed<seed>][-<name_suffix>].mp4`` in ``save_path``,
    made unique so an existing file is never overwritten.
    """
    if output_path:
        return Path(output_path)
    stem = slugify(output_file_name) if output_file_name else slugify(prompt)
    if seed is not None:
        stem += f"-seed{seed}"
    if name_suffix:
        stem += f"-{slugify(name_suffix)}"
    return unique_path(save_path, stem)

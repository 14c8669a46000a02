"""The latents file: one safetensors file, tensor ``latents [B, F, C, h, w]`` plus JSON metadata.

The one format for every latents file: the generator's (``<name>.latents.safetensors`` kept
when decoding or writing fails, read by ``python -m stepvideo.decode``), the evaluation
runner's ``--save_latents`` (beside each mp4), ``python -m stepvideo.vae encode``'s, and read
by ``python -m stepvideo.vae decode`` and ``benchmark/compare.py``.

The safetensors metadata (string-to-string, as safetensors requires) is
``{"format": "stepvideo.latents/1", "stepvideo": <JSON object>}``; the object carries what the
writer knows, with these names: ``prompt``, ``sampling`` (``SamplingConfig.to_dict()``),
``output`` (``{"fps", "crop_540p", "denoise_filter"}``), ``video_path``, and e.g. ``id``,
``source``, ``frames``, ``fps``. :func:`load_latents` also reads the two layouts written before
(the generator's flat ``format``/``prompt``/``sampling``/``output`` strings, and the
``"stepvideo"`` object without ``format``) and a file with a single tensor under another key.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..io.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

FORMAT = "stepvideo.latents/1"
LATENTS_KEY = "latents"
METADATA_KEY = "stepvideo"
SUFFIX = ".latents.safetensors"
_FLAT_JSON_FIELDS = ("sampling", "output")      # JSON strings in the generator's former flat layout


def latents_path(video: Union[str, os.PathLike]) -> Path:
    """``dir/001-x.mp4`` -> ``dir/001-x.latents.safetensors``."""
    video = Path(video)
    return video.with_name(video.stem + SUFFIX)


def video_path_for(latents: Union[str, os.PathLike]) -> Path:
    """The inverse of :func:`latents_path`: ``dir/x.latents.safetensors`` -> ``dir/x.mp4``
    (another name: its stem + ``.mp4``)."""
    latents = Path(latents)
    stem = latents.name[:-len(SUFFIX)] if latents.name.endswith(SUFFIX) else latents.stem
    return latents.with_name(stem + ".mp4")


def run_metadata(prompt: str, sampling, output=None, **extra) -> dict:
    """The metadata of latents made by a generation: the prompt, ``sampling`` (a ``SamplingConfig``),
    the output settings of ``output`` (an ``OutputConfig`` or anything with ``fps``, ``crop_540p``,
    ``denoise_filter``) when given, and ``extra``."""
    metadata = {"prompt": prompt, "sampling": sampling.to_dict()}
    if output is not None:
        metadata["output"] = {"fps": output.fps, "crop_540p": output.crop_540p,
                              "denoise_filter": output.denoise_filter}
    metadata.update(extra)
    return metadata


def save_latents(path: Union[str, os.PathLike], latents: torch.Tensor, metadata: Optional[dict] = None) -> Path:
    """Write ``latents [B, F, C, h, w]`` (moved to CPU, contiguous) and ``metadata`` atomically; return ``path``."""
    from safetensors.torch import save

    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, F, C, h, w], got shape {list(latents.shape)}")
    meta = {"format": FORMAT,
            METADATA_KEY: json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True, default=str)}
    data = save({LATENTS_KEY: latents.detach().cpu().contiguous()}, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data)


def load_latents(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, dict]:
    """``(latents [B, F, C, h, w], metadata dict)``; errors name the file and the problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = LATENTS_KEY if LATENTS_KEY in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: expected a tensor named {LATENTS_KEY!r} (or a single tensor), "
                                 f"found {keys}")
            latents = f.get_tensor(key)
            file_meta = f.metadata() or {}
    except ValueError:
        raise
    except Exception as err:          # safetensors raises its own error types for broken files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if latents.ndim == 4:
        latents = latents.unsqueeze(0)                      # [F, C, h, w] -> [1, F, C, h, w]
    if latents.ndim != 5 or not latents.is_floating_point():
        raise ValueError(f"{path}: latents must be a float tensor [B, F, C, h, w], got {latents.dtype} "
                         f"{list(latents.shape)}")
    return latents, _parse_metadata(file_meta)


def _parse_metadata(file_meta: dict) -> dict:
    """Our ``"stepvideo"`` JSON object; else the generator's former flat layout (``format`` set,
    ``sampling``/``output`` as JSON strings, the rest plain strings); else every entry with JSON
    values decoded where possible (files written by other tools)."""
    def value(text):
        try:
            return json.loads(text)
        except (TypeError, json.JSONDecodeError):
            return text

    if METADATA_KEY in file_meta:
        parsed = value(file_meta[METADATA_KEY])
        return parsed if isinstance(parsed, dict) else {"value": parsed}
    if file_meta.get("format") == FORMAT:
        return {k: value(v) if k in _FLAT_JSON_FIELDS else v for k, v in file_meta.items() if k != "format"}
    return {k: value(v) for k, v in file_meta.items()}

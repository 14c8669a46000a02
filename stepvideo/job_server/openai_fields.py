"""The shared video-job fields (OpenAI ``client.videos.create``, SGLang, vLLM-Omni, FastVideo, LiteLLM)
mapped onto our own, before :func:`.requests.build_job` validates them.

Shared field            ours                 how
``model``               (none)               must be the held model's id (:func:`served_model_name`)
``seconds``             ``num_frames``       ``round(seconds x fps)``, then rounded like ``num_frames``
``size`` ``"WxH"``      ``width``/``height`` split, then checked like them
``input_reference``     ``image``            a file part, base64, a data URL or ``{"image_url": ...}``
``guidance_scale``      ``cfg_scale``        synonym
``flow_shift``          ``time_shift``       synonym
``fps``                 (job setting)        frames per second of the mp4 (and of ``seconds``)

A setting given twice with different values (``size`` and ``width``, ``seconds`` and
``num_frames``, ``guidance_scale`` and ``cfg_scale`` ...) is a 400 naming both fields. Errors
that the shared checks find about a mapped value name the field the client sent
(:func:`blame_sent_field`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .. import geometry
from . import guards
from .requests import API_FIELDS, RequestError, parse_form

DEFAULT_FPS = 25
MAX_FPS = 120
SHARED_FIELDS = ("model", "seconds", "size", "input_reference", "guidance_scale", "flow_shift", "fps")
SYNONYMS = {"guidance_scale": "cfg_scale", "flow_shift": "time_shift", "input_reference": "image"}
FORM_TYPES = {"fps": int, "guidance_scale": float, "flow_shift": float}
ACCEPTED = tuple(sorted(set(API_FIELDS) | set(SHARED_FIELDS)))
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


@dataclass(frozen=True)
class NativeFields:
    """A request in our own field names; ``sent_as`` maps each of them to the field the client used."""

    fields: Dict[str, Any]
    fps: int
    sent_as: Dict[str, str]


def served_model_name(is_ti2v: bool, preset: Optional[str], model_dir: str, override: Optional[str]) -> str:
    """The id clients pass as ``model``: ``--served_model_name``, else ``stepvideo-ti2v`` for a TI2V
    checkpoint, ``stepvideo-t2v-turbo`` when the launch preset or the folder name says turbo, else
    ``stepvideo-t2v``."""
    if override:
        return override
    if is_ti2v:
        return "stepvideo-ti2v"
    if preset == "t2v-turbo" or "turbo" in Path(model_dir).name.lower():
        return "stepvideo-t2v-turbo"
    return "stepvideo-t2v"


def parse_form_values(form: Mapping[str, str]) -> Dict[str, Any]:
    """Typed values of the shared fields of a multipart form (every form value is a string);
    ``input_reference[image_url]`` (the SDK's form spelling of ``{"image_url": ...}``) included."""
    out = parse_form({k: v for k, v in form.items() if k in FORM_TYPES}, None, FORM_TYPES)
    if "input_reference[image_url]" in form:
        out["input_reference"] = {"image_url": form["input_reference[image_url]"]}
    return out


def to_native(fields: Mapping[str, Any], served_model: str) -> NativeFields:
    """The request in our names; raises :class:`RequestError` for an unknown field, a wrong
    ``model``, a malformed ``size``/``seconds`` or a setting given twice with different values."""
    unknown = sorted(set(fields) - set(ACCEPTED), key=str)
    if unknown:
        raise RequestError(f"unknown field(s) {guards.name_some(unknown)}; accepted: {list(ACCEPTED)}",
                           guards.show_name(unknown[0]))
    native = {k: v for k, v in fields.items() if k not in SHARED_FIELDS}
    sent_as = {k: k for k in native}

    model = fields.get("model")
    if model is not None and model != served_model:
        raise RequestError(f"field 'model': this server holds the model '{served_model}', not {model!r}; "
                           f"send model='{served_model}' or leave it out", "model", 404)
    fps = _fps(fields.get("fps"))

    def put(ours: str, value: Any, sent: str) -> None:
        if value is None:
            return
        if native.get(ours) is not None and not _same(native[ours], value, ours):
            raise RequestError(f"fields '{sent_as[ours]}' and '{sent}' give two different {ours} "
                               f"({native[ours]!r} and {value!r}); send one of them", sent)
        native[ours] = value
        sent_as[ours] = sent

    for shared, ours in SYNONYMS.items():
        if shared != "input_reference":
            put(ours, fields.get(shared), shared)
    put("image", _image_value(fields.get("input_reference")), "input_reference")
    if fields.get("size") is not None:
        width, height = _size(fields["size"])
        put("width", width, "size")
        put("height", height, "size")
    if fields.get("seconds") is not None:
        put("num_frames", _frames(fields["seconds"], fps), "seconds")
    return NativeFields(native, fps, sent_as)


def blame_sent_field(err: RequestError, sent_as: Mapping[str, str]) -> RequestError:
    """``err`` about one of our fields, re-worded with the field the client sent (``size`` for
    ``height``, ``seconds`` for ``num_frames``, ``guidance_scale`` for ``cfg_scale`` ...)."""
    sent = sent_as.get(err.field or "")
    if sent is None or sent == err.field:
        return err
    text = str(err).removeprefix(f"field '{err.field}': ")
    return RequestError(f"field '{sent}': {text}", sent, err.status)


def video_seconds(num_frames: int, fps: int) -> str:
    """The clip length as the video object reports it: ``"4"``, ``"0.68"``."""
    return format(round(num_frames / fps, 2), "g")


def _same(a: Any, b: Any, ours: str) -> bool:
    if ours == "num_frames" and isinstance(a, int) and isinstance(b, int):
        return geometry.round_frames(a) == geometry.round_frames(b)
    return a == b


def _fps(value: Any) -> int:
    if value is None:
        return DEFAULT_FPS
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"field 'fps' must be an integer, got {type(value).__name__} {value!r}", "fps")
    if not 1 <= value <= MAX_FPS:
        raise RequestError(f"field 'fps' must be in [1, {MAX_FPS}], got {value}", "fps", 422)
    return value


def _size(value: Any) -> Tuple[int, int]:
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f"field 'size' must be a string 'WIDTHxHEIGHT' such as '992x544', got {value!r}",
                           "size")
    return int(match.group(1)), int(match.group(2))


def _frames(value: Any, fps: int) -> int:
    """``seconds`` (a string or a number) -> pixel frames ``round(seconds x fps)``."""
    seconds = value
    if isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise RequestError(f"field 'seconds' must be a number of seconds (a string or a number), got {value!r}",
                           "seconds")
    frames = int(round(seconds * fps))
    least = geometry.FRAMES_PER_CHUNK
    if frames < least:
        raise RequestError(f"field 'seconds': {seconds:g} s at {fps} fps is {frames} frames; the model makes at "
                           f"least {least} frames ({video_seconds(least, fps)} s at {fps} fps)", "seconds", 422)
    return frames


def _image_value(value: Any) -> Any:
    """``input_reference`` -> what ``image`` accepts (bytes, base64 or a data URL)."""
    if not isinstance(value, Mapping):
        return value
    if value.get("file_id"):
        raise RequestError("field 'input_reference': file ids are not supported here; upload the image as a "
                           "file part or send it as a data URL", "input_reference", 422)
    url = value.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError("field 'input_reference': 'image_url' must be a data URL "
                           "('data:image/png;base64,...'); this server does not fetch URLs", "input_reference", 422)
    return url

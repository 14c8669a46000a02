"""``POST /v1/videos`` body -> a validated job, with the CLI's own sampling code.

The settings of a job are built exactly as ``run_parallel.py`` builds them from flags
(:func:`stepvideo.sampling.sampling_from_options`): the preset (the job's ``preset``, else the
server's ``--preset``, else ``ti2v`` with an image and ``t2v`` without), then the sampling flags
the server was started with, then the job's own fields. Sizes are rounded as the pipeline
rounds them (frames to a multiple of 17, sides to multiples of 16), and the layout checks of
``torchrun`` runs (``validate_before_loading``) run on the job's token count, all before the
job is queued. A job without a seed gets a random one, reported in its settings.

Errors are :class:`RequestError`: 400 for a malformed body, a wrong type or an unknown field;
422 for a well-formed value the server cannot run. Each names its field.
"""
from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from ..config import SamplingConfig
from ..parallel.state import validate_before_loading
from ..pipelines.pipeline import StepVideoPipeline
from ..sampling import sampling_from_options, token_count
from . import guards
from .capacity import JobLimits, job_problem
from .config import ServerConfig

# API field -> SamplingConfig field (None: not a sampling field)
API_FIELDS = {"prompt": None, "negative_prompt": "neg_magic", "height": "height", "width": "width",
              "num_frames": "num_frames", "num_inference_steps": "num_inference_steps",
              "cfg_scale": "guidance_scale", "time_shift": "time_shift", "motion_score": "motion_score",
              "seed": "seed", "preset": "preset", "cache": "cache", "image": None}
_API_NAME = {sampling: api for api, sampling in API_FIELDS.items() if sampling is not None}
_FORM_TYPES = {"height": int, "width": int, "num_frames": int, "num_inference_steps": int, "seed": int,
               "cfg_scale": float, "time_shift": float, "motion_score": float}
IMAGE_FORMATS = ("PNG", "JPEG")
UPLOAD_FIELDS = ("image", "input_reference")      # the fields a multipart body may send as files
MAX_MESSAGE_CHARS = 300     # of a refusal that quotes the client's value


class RequestError(ValueError):
    """A rejected request: ``status`` 400 or 422, ``field`` the API field at fault (or None)."""

    def __init__(self, message: str, field: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the loaded model and the layout."""

    is_ti2v: bool
    num_heads: int
    parallel: Any            # ParallelConfig
    world_size: int
    name: str = "stepvideo-t2v"     # the id clients send as ``model`` (openai_fields.served_model_name)
    limits: Optional[JobLimits] = None     # the service's decode limits and the layout's memory
    prompt_length: Any = None    # text_encoders.prompt_length.PromptLengthCounter (None: not counted)


@dataclass(frozen=True)
class JobRequest:
    prompt: str
    sampling: SamplingConfig
    preset: str
    image: Optional[bytes]
    prompt_tokens: Optional[Dict[str, Any]] = None     # PromptLength.to_dict(): what the text encoders read

    def settings(self) -> Dict[str, Any]:
        """What the job runs with, as the API reports it."""
        extra = {} if self.prompt_tokens is None else {"prompt_tokens": self.prompt_tokens}
        return {"preset": self.preset, **self.sampling.to_dict(), "image": self.image is not None, **extra}


def read_json_body(data: bytes) -> Any:
    """A JSON body -> its value (:func:`.guards.parse_json_body`: UTF-8, depth, finite numbers)."""
    return _guarded(guards.parse_json_body, data)


def read_form_parts(request: Any) -> Tuple[Dict[str, str], Dict[str, bytes]]:
    """A multipart / url-encoded flask request -> (text fields, uploads as bytes), bounded by
    :func:`.guards.read_form`; uploads only under :data:`UPLOAD_FIELDS`."""
    return _guarded(guards.read_form, request, UPLOAD_FIELDS)


def _guarded(check, *args) -> Any:
    try:
        return check(*args)
    except guards.InvalidInput as err:
        raise RequestError(str(err), err.field, err.status) from None


def parse_form(form: Mapping[str, str], image: Optional[bytes],
               types: Mapping[str, type] = _FORM_TYPES) -> Dict[str, Any]:
    """Multipart fields (all strings) -> typed fields (``types``: name -> int or float; other
    fields stay strings); the ``image`` upload is passed as bytes."""
    fields: Dict[str, Any] = {}
    for name, raw in form.items():
        kind = types.get(name)
        if kind is None:
            fields[name] = raw
            continue
        try:
            fields[name] = kind(raw)
        except ValueError:
            raise RequestError(f"field '{name}' must be {'an integer' if kind is int else 'a number'}, "
                               f"got {_show(raw)}", name) from None
    if image is not None:
        fields["image"] = image
    return fields


def build_job(fields: Mapping[str, Any], server_options: Mapping[str, Any], model: ModelInfo,
              config: ServerConfig) -> JobRequest:
    """Validate ``fields`` (JSON values, or :func:`parse_form` output) into a :class:`JobRequest`."""
    if not isinstance(fields, Mapping):
        raise RequestError(f"the body must be a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(API_FIELDS), key=str)
    if unknown:
        raise RequestError(f"unknown field(s) {guards.name_some(unknown)}; accepted: {sorted(API_FIELDS)}",
                           guards.show_name(unknown[0]))
    _guarded(guards.check_values, fields)
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"field 'prompt' must be a non-empty string, got {_show(prompt)}", "prompt")
    if len(prompt) > config.max_prompt_chars:
        raise RequestError(f"field 'prompt' has {len(prompt)} characters; this server accepts at most "
                           f"{config.max_prompt_chars} (--max_prompt_chars)", "prompt", 422)
    image = _image_bytes(fields.get("image"), config)
    if model.is_ti2v and image is None:
        raise RequestError("field 'image' is required: this server runs an image-to-video (TI2V) model; send the "
                           "first frame as base64 PNG/JPEG or as a multipart upload named 'image'", "image", 422)
    if not model.is_ti2v and image is not None:
        raise RequestError("field 'image' is not accepted: this server runs a text-to-video (T2V) model",
                           "image", 422)

    options = {k: v for k, v in server_options.items() if v is not None}
    for api_name, name in API_FIELDS.items():
        if name is not None and fields.get(api_name) is not None:
            options[name] = fields[api_name]
    seed = options.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2 ** 63:
        raise RequestError(f"field 'seed' must be in [0, 2**63), got {seed}", "seed", 422)
    try:
        sampling = sampling_from_options(options, has_image=image is not None)
    except ValueError as err:
        raise _named(err) from None
    preset = options.get("preset") or ("ti2v" if image is not None else "t2v")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the rounding is reported through the settings
        height, width, frames = StepVideoPipeline.check_inputs(sampling.height, sampling.width, sampling.num_frames)
    sampling = replace(sampling, height=height, width=width, num_frames=frames)
    if sampling.seed is None:
        sampling = replace(sampling, seed=secrets.randbelow(2 ** 31))
    _check_cost(sampling, model, config)
    tokens = None
    if model.prompt_length is not None:
        length = model.prompt_length.check(prompt, sampling.pos_magic)
        tokens = {**length.to_dict(), **({"warning": length.warning()} if length.truncated else {})}
    return JobRequest(prompt=prompt, sampling=sampling, preset=preset, image=image, prompt_tokens=tokens)


def _check_cost(sampling: SamplingConfig, model: ModelInfo, config: ServerConfig) -> None:
    if sampling.num_inference_steps > config.max_steps:
        raise RequestError(f"field 'num_inference_steps' is {sampling.num_inference_steps}; this server runs at most "
                           f"{config.max_steps} steps per job (--max_steps)", "num_inference_steps", 422)
    tokens = token_count(sampling)
    if tokens > config.max_tokens:
        raise RequestError(f"fields 'num_frames', 'height', 'width' ({sampling.num_frames} x {sampling.height} x "
                           f"{sampling.width}) make {tokens} DiT tokens; this server accepts at most "
                           f"{config.max_tokens} per job (--max_tokens)", "num_frames", 422)
    problem = job_problem(sampling.height, sampling.width, sampling.num_frames, model.limits)
    if problem is not None:
        raise RequestError(f"fields 'num_frames', 'height', 'width' ({sampling.num_frames} x {sampling.height} x "
                           f"{sampling.width}): {problem}", "num_frames", 422)
    try:
        validate_before_loading(model.parallel, num_heads=model.num_heads, world_size=model.world_size,
                                token_count=tokens)
    except ValueError as err:
        raise RequestError(f"fields 'num_frames', 'height', 'width': {err}", "num_frames", 422) from None


def _named(err: ValueError) -> RequestError:
    """A sampling ValueError, re-worded with the API's field names (and cut short: it may quote
    a long client value)."""
    message = str(err)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    for name, api in sorted(_API_NAME.items(), key=lambda kv: -len(kv[0])):
        if message.startswith(name) or f" {name} " in message or message.startswith(f"`{name}`"):
            wrong_type = any(f"must be {kind}," in message for kind in ("a number", "an integer", "a string"))
            status = 400 if wrong_type else 422
            return RequestError(f"field '{api}': {message}", api, status)
    if message.startswith("height and width"):
        return RequestError(f"fields 'height', 'width': {message}", "height", 422)
    if message.startswith("unknown preset"):
        return RequestError(f"field 'preset': {message}", "preset", 422)
    return RequestError(message, None, 422)


def _image_bytes(value: Any, config: ServerConfig) -> Optional[bytes]:
    """base64 text (optionally a ``data:image/...;base64,`` URL) or raw upload bytes -> checked bytes."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            _, _, text = text.partition(",")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("field 'image' must be base64-encoded PNG or JPEG bytes (or a multipart upload)",
                               "image") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise RequestError(f"field 'image' must be a base64 string, got {type(value).__name__}", "image")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt not in IMAGE_FORMATS:
                raise RequestError(f"field 'image' must be PNG or JPEG, got {fmt}", "image", 422)
            if w * h > config.max_image_pixels:
                raise RequestError(f"field 'image' is {w}x{h}; this server accepts at most {config.max_image_pixels} "
                                   "pixels", "image", 422)
            img.verify()
    except RequestError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the client's bad input
        raise RequestError("field 'image' is not a readable PNG/JPEG image", "image") from None
    return data


def _show(value: Any) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."

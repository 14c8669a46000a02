"""The service's request handlers, one function per route (the table is in :mod:`.routes`).

A handler takes a :class:`Call` (the app state, the loaded components for model routes, the
Flask request) and returns a Response; it raises :class:`~.protocol.ProtocolError` (4xx),
:class:`~.gate.DeviceBusy` (503) or lets anything else reach the dispatcher in
:mod:`.server`, which turns every failure into a JSON answer.

Model handlers follow one order: check the body's type and size, read the tensor header
(shapes, no data), check the shape limits and the predicted memory against the budget, only
then materialise the tensors and wait for the device.
"""
from __future__ import annotations

import io
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from flask import Request, Response
from werkzeug.wsgi import wrap_file

from .. import __version__
from ..http_errors import error_body
from ..io.frames import to_uint8_frames
from .components import ServiceComponents
from .cost import check_budget, decode_limits
from .protocol import (FLOAT_DTYPES, JSON_CONTENT_TYPE, PROTOCOL_VERSION, TENSOR_CONTENT_TYPE, ProtocolError, check_tensor, check_text,
                       decode_json, decode_tensors, dtype_name, encode_json, encode_tensors, media_type, read_header)
from .state import NotReady, ServiceState

RESPONSE_BLOCK = 4 << 20    # bytes per write when streaming a tensor response
LOADING_RETRY_AFTER = 10    # seconds suggested while the models load
DECODE_OUTPUTS = ("float", "uint8")
ENCODE_MODES = ("sample", "mean")


@dataclass
class Call:
    """One request as a handler sees it. ``comps`` is None for status routes."""

    state: ServiceState
    request: Request
    comps: Optional[ServiceComponents] = None
    on_close: Optional[Callable[[], None]] = None     # run once the answer has been sent (or dropped)

    @property
    def config(self):
        return self.state.config


# ----------------------------------------------------------------------------------------
# Responses and request helpers
# ----------------------------------------------------------------------------------------

def json_response(obj: Dict[str, Any], status: int = 200, retry_after: Optional[int] = None) -> Response:
    resp = Response(encode_json(obj), status=status, mimetype=JSON_CONTENT_TYPE)
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def error_response(status: int, message: str, retry_after: Optional[int] = None, **details: Any) -> Response:
    return json_response(error_body(message, **details), status, retry_after)


class _Body(io.BytesIO):
    """Response bytes that run ``on_close`` when the WSGI server closes them (sent or dropped)."""

    def __init__(self, data: bytes, on_close: Optional[Callable[[], None]]):
        super().__init__(data)
        self._on_close = on_close

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().close()


def tensor_response(call: Call, tensors: Dict[str, torch.Tensor], options: Optional[Dict[str, Any]] = None) -> Response:
    body = encode_tensors(tensors, options)
    # the WSGI server's file wrapper sends the bytes as they are, without copying them into its buffers
    stream = wrap_file(call.request.environ, _Body(body, call.on_close), RESPONSE_BLOCK)
    resp = Response(stream, mimetype=TENSOR_CONTENT_TYPE, direct_passthrough=True)
    resp.content_length = len(body)
    return resp


def read_body(call: Call, kind: str) -> bytes:
    request, limit = call.request, call.config.max_body_bytes
    got = media_type(request.content_type)
    if got != kind:
        raise ProtocolError(f"{request.path} expects Content-Type {kind}, got {got or 'none'}", status=415)
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolError(f"request body of {request.content_length} bytes is larger than this service "
                            f"accepts ({limit} bytes; raise it with --max_body_mb)", status=413)
    return request.get_data(cache=False)


def model_device(call: Call, part: str) -> str:
    if getattr(call.comps, part) is None:
        raise ProtocolError(f"this service was started without the {part} model, so {call.request.path} is "
                            "not available", status=404)
    return call.comps.caption_device if part == "caption" else call.comps.vae_device


def check_options(options: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ProtocolError(f"unknown option(s) {unknown}; this route accepts {sorted(defaults)}")
    return {**defaults, **options}


def check_prompt_request(obj: Dict[str, Any], config) -> List[str]:
    unknown = sorted(set(obj) - {"prompts", "protocol"})
    if unknown:
        raise ProtocolError(f"unknown field(s) in the caption request: {unknown}; expected 'prompts'")
    prompts = obj.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise ProtocolError(f"'prompts' must be a non-empty list of strings, got {type(prompts).__name__}"
                            + (" (empty)" if prompts == [] else ""))
    if len(prompts) > config.max_prompts:
        raise ProtocolError(f"'prompts' holds {len(prompts)} prompts; this service accepts at most "
                            f"{config.max_prompts} per request (--max_prompts)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ProtocolError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        if len(p) > config.max_prompt_chars:
            raise ProtocolError(f"prompts[{i}] has {len(p)} characters; this service accepts at most "
                                f"{config.max_prompt_chars} (--max_prompt_chars)")
        check_text(f"prompts[{i}]", p)
    return prompts


def run_model(call: Call, device: str, fn, *args):
    """``fn(*args)`` with the device to itself (its gate) and without autograd."""
    with call.state.gate(device).hold(), torch.inference_mode():
        if call.config.test_delay:
            time.sleep(call.config.test_delay)
        return fn(*args)


# ----------------------------------------------------------------------------------------
# Model routes
# ----------------------------------------------------------------------------------------

def caption(call: Call) -> Response:
    """``POST /caption-api``: JSON ``{"prompts": [...]}`` -> tensors ``y``, ``y_mask``, ``clip_embedding``."""
    device = model_device(call, "caption")
    obj = decode_json(read_body(call, JSON_CONTENT_TYPE), call.config.max_json_depth)
    prompts = check_prompt_request(obj, call.config)
    out = run_model(call, device, call.comps.caption.embedding, prompts)
    return tensor_response(call, {k: out[k] for k in ("y", "y_mask", "clip_embedding")})


def _bounded_vae_input(call: Call, body: bytes, specs, name: str, channels: int, what: str,
                       cost_bytes: Callable[[Any, Tuple[int, ...], torch.dtype], int], **check) -> torch.Tensor:
    """The 5-D tensor ``name`` of a VAE request (``channels`` on dim 2), its cost bounded from the
    declared header ``specs`` before the payload is read: ``cost_bytes(cost, shape, dtype)``
    refuses a shape the service does not take and returns the bytes the request needs, checked
    against the memory budget (``what`` names the request in the refusal). ``check``: more
    :func:`check_tensor` arguments (``layout``, ``dtypes``)."""
    spec = specs.get(name)
    cost = call.state.vae_cost
    if cost is not None and spec is not None and len(spec.shape) == 5 and spec.shape[2] == channels \
            and spec.dtype in FLOAT_DTYPES and spec.numel:
        check_budget(what, spec.shape, cost_bytes(cost, spec.shape, spec.dtype), call.state.budget_bytes)
    msg = decode_tensors(body, expected_names=[name], max_depth=call.config.max_json_depth)
    return check_tensor(name, msg.tensors[name], ndim=5, sizes={2: channels}, **check)


def vae_decode(call: Call) -> Response:
    """``POST /vae-api``: tensors ``samples [B, F, z, h, w]`` -> ``video [B, T, 3, H, W]``."""
    device = model_device(call, "vae")
    vae = call.comps.vae
    body = read_body(call, TENSOR_CONTENT_TYPE)
    specs, options = read_header(body, max_depth=call.config.max_json_depth)
    output = check_options(options, {"output": "float"})["output"]
    if output not in DECODE_OUTPUTS:
        raise ProtocolError(f"option 'output' must be one of {DECODE_OUTPUTS}, got {output!r}")

    def decode_cost(cost, shape, dtype) -> int:
        cost.check_decode_shape(shape)
        return cost.decode_bytes(shape, dtype, output)

    samples = _bounded_vae_input(call, body, specs, "samples", vae.z_channels, "decode (/vae-api)", decode_cost,
                                 layout="[B, F, C, h, w]")

    video = run_model(call, device, lambda z: decoded_video(vae, z, output), samples)
    return tensor_response(call, {"video": video}, {"output": output})


def vae_encode(call: Call) -> Response:
    """``POST /vae-encode-api``: tensors ``videos [B, T, 3, H, W]`` -> ``latents [B, F, z, h, w]``."""
    device = model_device(call, "vae")
    vae = call.comps.vae
    body = read_body(call, TENSOR_CONTENT_TYPE)
    specs, options = read_header(body, max_depth=call.config.max_json_depth)
    options = check_options(options, {"mode": "sample", "seed": None})
    mode, seed = options["mode"], options["seed"]
    if mode not in ENCODE_MODES:
        raise ProtocolError(f"option 'mode' must be one of {ENCODE_MODES}, got {mode!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ProtocolError(f"option 'seed' must be null or an integer in [0, 2**63), got {seed!r}")

    def encode_cost(cost, shape, dtype) -> int:
        cost.check_encode_shape(shape)
        return cost.encode_bytes(shape, dtype)

    videos = _bounded_vae_input(call, body, specs, "videos", vae.in_channels, "encode (/vae-encode-api)",
                                encode_cost, dtypes=FLOAT_DTYPES, layout="[B, T, C, H, W]")
    latents = run_model(call, device, lambda x: encoded_latents(vae, x, mode, seed), videos)
    return tensor_response(call, {"latents": latents}, {"mode": mode, "seed": seed})


def decoded_video(vae, samples: torch.Tensor, output: str) -> torch.Tensor:
    """What ``/vae-api`` answers for ``samples [B, F, z, h, w]`` (any device): the video
    ``[B, T, 3, H, W]`` on the host, in the VAE dtype or as uint8 frames (``output``). The model
    work of the route, also run by the service rehearsal (``benchmark/rehearse.py --service``)."""
    video = vae.decode(samples)
    return (to_uint8_frames(video) if output == "uint8" else video).cpu()


def encoded_latents(vae, videos: torch.Tensor, mode: str, seed: Optional[int]) -> torch.Tensor:
    """What ``/vae-encode-api`` answers for ``videos [B, T, 3, H, W]``: the latents
    ``[B, F, z, h, w]`` on the host (``mode``: "sample" or "mean"; ``seed``: a reproducible sample)."""
    # a CPU generator makes seeded samples identical whatever device the VAE runs on
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    return vae.encode(videos, generator=generator, mode=mode).cpu()


# ----------------------------------------------------------------------------------------
# Status routes (no admission, no models needed: always answered at once)
# ----------------------------------------------------------------------------------------

def health(call: Call) -> Response:
    """``GET /health``: ``{"status": "alive", "ready": bool}`` as soon as the port is bound."""
    return json_response({"status": "alive", "ready": call.state.ready})


def ready(call: Call) -> Response:
    """``GET /ready``: 200 with models, devices, dtypes, limits and versions; 503 while loading."""
    try:
        comps = call.state.components()
    except NotReady as err:
        return json_response({"ready": False, "error": str(err)}, err.status,
                             LOADING_RETRY_AFTER if err.status == 503 else None)
    return json_response(ready_info(call.state, comps))


def ready_info(state: ServiceState, comps: ServiceComponents) -> Dict[str, Any]:
    from .routes import ROUTES          # cycle: routes.py imports these handlers

    config = state.config
    info: Dict[str, Any] = {
        "ready": True,
        "service": "stepvideo caption/VAE service",
        "protocol": PROTOCOL_VERSION,
        "versions": {"stepvideo": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "routes": {r.ready_key: (r.path if r.model is None or getattr(comps, r.model) is not None else None)
                   for r in ROUTES if r.ready_key},
        "limits": {"max_body_bytes": config.max_body_bytes, "max_prompts": config.max_prompts,
                   "max_prompt_chars": config.max_prompt_chars, "queue_size": config.queue_size,
                   "queue_timeout": config.queue_timeout, "threads": config.threads,
                   "max_memory_bytes": state.budget_bytes, "max_memory_source": state.budget_source,
                   "max_json_depth": config.max_json_depth, **decode_limits()},
        "auth": config.token is not None,
        "uptime_seconds": round(time.time() - state.started, 1),
        "caption": None,
        "vae": None,
    }
    if comps.caption is not None:
        info["caption"] = {"device": comps.caption_device, **comps.info.get("caption", {})}
    if comps.vae is not None:
        vae = comps.vae
        info["vae"] = {"device": comps.vae_device, "dtype": dtype_name(vae.dtype), "z_channels": vae.z_channels,
                       "in_channels": vae.in_channels, **comps.info.get("vae", {})}
    return info


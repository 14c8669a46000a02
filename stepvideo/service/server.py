"""The caption/VAE service: ``create_app(components, config)`` and a production server around it.

Routes (all answers carry ``X-Stepvideo-Protocol``; errors are ``{"error": "..."}``)::

    POST /caption-api      JSON {"prompts": [...]}            -> tensors y, y_mask, clip_embedding
    POST /vae-api          tensors {samples [B, F, z, h, w]}   -> tensors {video [B, T, 3, H, W]}
                           options {"output": "float" | "uint8"}
    POST /vae-encode-api   tensors {videos [B, T, 3, H, W]}    -> tensors {latents [B, F, z, h, w]}
                           options {"mode": "sample" | "mean", "seed": int | null}
    GET  /health           {"status": "alive", "ready": bool}
    GET  /ready            200 with models, devices, dtypes, versions; 503 while loading

Status codes: 400 bad input, 401 token, 404/405 routing, 413 body too large, 415 content type,
500 bug or failed model load, 503 (+ ``Retry-After``) busy device, CUDA out of memory, or models
still loading. Whatever a request does, the server keeps serving.
"""
from __future__ import annotations

import hmac
import io
import logging
import platform
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

from .. import __version__
from ..io.frames import to_uint8_frames
from .components import ServiceComponents
from .config import ServiceConfig
from .gate import DeviceBusy, DeviceGate
from .protocol import (FLOAT_DTYPES, JSON_CONTENT_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, TENSOR_CONTENT_TYPE,
                       ProtocolError, check_tensor, decode_json, decode_tensors, dtype_name, encode_json,
                       encode_tensors, media_type)

logger = logging.getLogger(__name__)

OOM_RETRY_AFTER = 30        # seconds suggested after a CUDA out-of-memory
LOADING_RETRY_AFTER = 10    # seconds suggested while the models load
RESPONSE_BLOCK = 4 << 20    # bytes per write when streaming a tensor response
DECODE_OUTPUTS = ("float", "uint8")
ENCODE_MODES = ("sample", "mean")

ComponentsArg = Union[ServiceComponents, "Future[ServiceComponents]"]


class NotReady(Exception):
    """Models still loading (503) or failed to load (500)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA (or host) out-of-memory, whichever exception type this torch build raises."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(err, MemoryError) or (oom_type is not None and isinstance(err, oom_type)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class _Service:
    """Per-app state: config, the (possibly still loading) components and the device gates."""

    def __init__(self, components: ComponentsArg, config: ServiceConfig):
        self.config = config
        self.started = time.time()
        if isinstance(components, ServiceComponents):
            done: Future = Future()
            done.set_result(components)
            components = done
        self._future = components
        self._gates: Dict[str, DeviceGate] = {}
        self._gates_lock = threading.Lock()

    def components(self) -> ServiceComponents:
        if not self._future.done():
            raise NotReady("models are still loading; poll GET /ready", 503)
        err = self._future.exception()
        if err is not None:
            raise NotReady(f"models failed to load: {type(err).__name__}: {err}", 500)
        return self._future.result()

    def gate(self, device: str) -> DeviceGate:
        with self._gates_lock:
            if device not in self._gates:
                self._gates[device] = DeviceGate(device, self.config.queue_size, self.config.queue_timeout)
            return self._gates[device]


# ----------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------

def _json_response(obj: Dict[str, Any], status: int = 200, retry_after: Optional[int] = None) -> Response:
    resp = Response(encode_json(obj), status=status, mimetype=JSON_CONTENT_TYPE)
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def _error(status: int, message: str, retry_after: Optional[int] = None) -> Response:
    return _json_response({"error": message}, status, retry_after)


def _tensor_response(tensors: Dict[str, torch.Tensor], options: Optional[Dict[str, Any]] = None) -> Response:
    body = encode_tensors(tensors, options)
    # the WSGI server's file wrapper sends the bytes as they are, without copying them into its buffers
    stream = wrap_file(request.environ, io.BytesIO(body), RESPONSE_BLOCK)
    resp = Response(stream, mimetype=TENSOR_CONTENT_TYPE, direct_passthrough=True)
    resp.content_length = len(body)
    return resp


def token_error(token: Optional[str], hint: str = "--token or STEPVIDEO_SERVICE_TOKEN") -> Optional[Response]:
    """``None`` when the request may pass, else the 401 answer (also used by ``stepvideo.serving``).

    With ``token`` set, every request must send ``Authorization: Bearer <token>`` (compared in
    constant time); ``hint`` names where the server's token comes from.
    """
    if token is None:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        resp = _error(401, "missing 'Authorization: Bearer <token>' header: this service requires the shared "
                           f"token it was started with ({hint})")
    elif not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        resp = _error(401, "invalid token in the Authorization header")
    else:
        return None
    resp.headers["WWW-Authenticate"] = 'Bearer realm="stepvideo"'
    return resp


# ----------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------

def create_app(components: ComponentsArg, config: ServiceConfig) -> Flask:
    """Build the Flask app that serves ``components`` under ``config``.

    Args:
        components: a :class:`ServiceComponents`, or a ``concurrent.futures.Future`` resolving to
            one (the launcher binds the port first and loads the models in the background;
            ``/ready`` answers 503 until the future is done, 500 if it failed).
        config: limits, token and queueing (:class:`ServiceConfig`). Host/port/device fields
            are used by the launcher, not here.
    """
    service = _Service(components, config)
    app = Flask("stepvideo.service")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["stepvideo_service"] = service

    @app.before_request
    def _check_token():
        return token_error(config.token)

    @app.after_request
    def _stamp(resp: Response) -> Response:
        resp.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        if err.code == 404:
            message = f"unknown route {request.path!r}; routes: {', '.join(sorted(_ROUTES))}"
        elif err.code == 405:
            message = f"method {request.method} is not allowed on {request.path}; use {_ROUTES.get(request.path, '?')}"
        elif err.code == 413:
            message = (f"request body is larger than this service accepts ({config.max_body_bytes} bytes; "
                       "raise it with --max_body_mb)")
        else:
            message = f"{err.name}: {err.description}"
        resp = err.get_response()     # keeps headers such as Allow
        resp.set_data(encode_json({"error": message}))
        resp.mimetype = JSON_CONTENT_TYPE
        return resp

    def endpoint(handler: Callable[[ServiceComponents], Response]) -> Callable[[], Response]:
        """Run ``handler`` with the loaded components and map every failure to a JSON answer."""

        def run() -> Response:
            start = time.perf_counter()
            try:
                resp = handler(service.components())
            except NotReady as err:
                return _error(err.status, str(err), LOADING_RETRY_AFTER if err.status == 503 else None)
            except ProtocolError as err:
                return _error(err.status, str(err))
            except DeviceBusy as err:
                return _error(503, str(err), err.retry_after)
            except HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - the server must answer every request
                if is_out_of_memory(err):
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    logger.warning("%s: out of memory (%s); cache emptied", request.path, err)
                    return _error(503, f"out of memory while serving {request.path} ({type(err).__name__}); the "
                                       "cache was emptied, retry later or send a smaller request", OOM_RETRY_AFTER)
                if isinstance(err, ValueError):
                    return _error(400, f"invalid input: {err}")
                logger.exception("%s failed", request.path)
                return _error(500, f"internal error in {request.path}: {type(err).__name__}: {err}")
            logger.info("%s %d in %.3f s", request.path, resp.status_code, time.perf_counter() - start)
            return resp

        run.__name__ = handler.__name__
        return run

    def read_body(kind: str) -> bytes:
        got = media_type(request.content_type)
        if got != kind:
            raise ProtocolError(f"{request.path} expects Content-Type {kind}, got {got or 'none'}", status=415)
        if request.content_length is not None and request.content_length > config.max_body_bytes:
            raise ProtocolError(f"request body of {request.content_length} bytes is larger than this service "
                                f"accepts ({config.max_body_bytes} bytes; raise it with --max_body_mb)", status=413)
        return request.get_data(cache=False)

    def model_device(comps: ServiceComponents, part: str) -> str:
        if getattr(comps, part) is None:
            raise ProtocolError(f"this service was started without the {part} model, so {request.path} is "
                                "not available", status=404)
        return comps.caption_device if part == "caption" else comps.vae_device

    # -- model routes ---------------------------------------------------------------------

    @endpoint
    def caption_api(comps: ServiceComponents) -> Response:
        device = model_device(comps, "caption")
        obj = decode_json(read_body(JSON_CONTENT_TYPE))
        prompts = _check_prompt_request(obj, config)
        with service.gate(device).hold(), torch.inference_mode():
            out = comps.caption.embedding(prompts)
        return _tensor_response({k: out[k] for k in ("y", "y_mask", "clip_embedding")})

    @endpoint
    def vae_api(comps: ServiceComponents) -> Response:
        device = model_device(comps, "vae")
        msg = decode_tensors(read_body(TENSOR_CONTENT_TYPE), expected_names=["samples"])
        output = _check_options(msg.options, {"output": "float"})["output"]
        if output not in DECODE_OUTPUTS:
            raise ProtocolError(f"option 'output' must be one of {DECODE_OUTPUTS}, got {output!r}")
        samples = check_tensor("samples", msg.tensors["samples"], ndim=5, sizes={2: comps.vae.z_channels},
                               layout="[B, F, C, h, w]")
        with service.gate(device).hold(), torch.inference_mode():
            video = comps.vae.decode(samples)
            video = to_uint8_frames(video) if output == "uint8" else video
            video = video.cpu()
        return _tensor_response({"video": video}, {"output": output})

    @endpoint
    def vae_encode_api(comps: ServiceComponents) -> Response:
        device = model_device(comps, "vae")
        msg = decode_tensors(read_body(TENSOR_CONTENT_TYPE), expected_names=["videos"])
        options = _check_options(msg.options, {"mode": "sample", "seed": None})
        mode, seed = options["mode"], options["seed"]
        if mode not in ENCODE_MODES:
            raise ProtocolError(f"option 'mode' must be one of {ENCODE_MODES}, got {mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise ProtocolError(f"option 'seed' must be null or an integer in [0, 2**63), got {seed!r}")
        videos = check_tensor("videos", msg.tensors["videos"], ndim=5, sizes={2: comps.vae.in_channels},
                              dtypes=FLOAT_DTYPES, layout="[B, T, C, H, W]")
        # a CPU generator makes seeded samples identical whatever device the VAE runs on
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        with service.gate(device).hold(), torch.inference_mode():
            latents = comps.vae.encode(videos, generator=generator, mode=mode).cpu()
        return _tensor_response({"latents": latents}, {"mode": mode, "seed": seed})

    # -- status routes --------------------------------------------------------------------

    def health() -> Response:
        return _json_response({"status": "alive", "ready": service._future.done()
                               and service._future.exception() is None})

    def ready() -> Response:
        try:
            comps = service.components()
        except NotReady as err:
            return _json_response({"ready": False, "error": str(err)}, err.status,
                                  LOADING_RETRY_AFTER if err.status == 503 else None)
        return _json_response(_ready_info(comps, config, service.started))

    app.add_url_rule("/caption-api", "caption_api", caption_api, methods=["POST"])
    app.add_url_rule("/vae-api", "vae_api", vae_api, methods=["POST"])
    app.add_url_rule("/vae-encode-api", "vae_encode_api", vae_encode_api, methods=["POST"])
    app.add_url_rule("/health", "health", health, methods=["GET"])
    app.add_url_rule("/ready", "ready", ready, methods=["GET"])
    return app


_ROUTES = {"/caption-api": "POST", "/vae-api": "POST", "/vae-encode-api": "POST", "/health": "GET", "/ready": "GET"}


def _check_prompt_request(obj: Dict[str, Any], config: ServiceConfig) -> List[str]:
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
    return prompts


def _check_options(options: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ProtocolError(f"unknown option(s) {unknown}; this route accepts {sorted(defaults)}")
    return {**defaults, **options}


def _ready_info(comps: ServiceComponents, config: ServiceConfig, started: float) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "ready": True,
        "service": "stepvideo caption/VAE service",
        "protocol": PROTOCOL_VERSION,
        "versions": {"stepvideo": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "routes": {"caption": "/caption-api" if comps.caption is not None else None,
                   "vae_decode": "/vae-api" if comps.vae is not None else None,
                   "vae_encode": "/vae-encode-api" if comps.vae is not None else None},
        "limits": {"max_body_bytes": config.max_body_bytes, "max_prompts": config.max_prompts,
                   "max_prompt_chars": config.max_prompt_chars, "queue_size": config.queue_size,
                   "queue_timeout": config.queue_timeout},
        "auth": config.token is not None,
        "uptime_seconds": round(time.time() - started, 1),
        "model_dir": comps.info.get("model_dir"),
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


# ----------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------

class ServiceServer:
    """A bound HTTP server for ``app``: waitress (production, threads) or Flask's dev server.

    The socket is bound at construction, so :attr:`port` is known (``config.port = 0`` picks a
    free one) before :meth:`run` blocks.
    """

    def __init__(self, app: Flask, config: ServiceConfig):
        self.config = config
        if config.dev_server:
            from werkzeug.serving import make_server

            self._server = make_server(config.host, config.port, app, threaded=True)
            self.port = self._server.server_port
        else:
            from waitress import create_server

            self._server = create_server(
                app, host=config.host, port=config.port, threads=config.threads, ident="stepvideo",
                # the app answers oversized bodies with a JSON 413; waitress's own limit is a backstop
                max_request_body_size=config.max_body_bytes + (1 << 20),
                inbuf_overflow=min(config.max_body_bytes, 64 << 20),   # typical requests stay in memory
                clear_untrusted_proxy_headers=True)
            self.port = self._server.effective_port

    def run(self) -> None:
        """Serve until interrupted (KeyboardInterrupt / :func:`_thread.interrupt_main`)."""
        if self.config.dev_server:
            try:
                self._server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                self._server.server_close()
        else:
            self._server.run()

    def close(self) -> None:
        if self.config.dev_server:
            self._server.shutdown()
        else:
            self._server.close()

"""The caption/VAE service app: ``create_app(components, config)``.

The routes come from one table (:data:`stepvideo.caption_service.routes.ROUTES`; handlers in
:mod:`.handlers`); this module adds what every request shares: the token check, the protocol
header, admission of model requests, and the mapping of every failure to a JSON answer.
The HTTP host (waitress) is :class:`stepvideo.caption_service.host.ServiceServer`.

All answers carry ``X-Stepvideo-Protocol``; errors are ``{"error": "..."}``. Status codes:
400 bad input (also invalid Unicode, JSON nested deeper than ``max_json_depth``), 401 token,
404/405 routing, 413 body too large or predicted memory over the budget, 415 content type,
422 a shape over the model-derived limits, 500 bug or failed model load, 503 (+
``Retry-After``) busy (admission limit, device queue), out of memory, or models still loading.
Whatever a request does, the server keeps serving.
"""
from __future__ import annotations

import hmac
import logging
import time
from typing import Callable, Optional

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..accelerator import accelerator
from ..http_errors import error_body
from .config import ServiceConfig
from .cost import RequestTooCostly
from .gate import DeviceBusy
from .handlers import LOADING_RETRY_AFTER, Call, error_response
from .incidents import internal_error
from .protocol import JSON_CONTENT_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, ProtocolError, encode_json
from .routes import ROUTES, ROUTES_BY_PATH, Route, route_list
from .state import ComponentsArg, NotReady, ServiceState

logger = logging.getLogger(__name__)

OOM_RETRY_AFTER = 30        # seconds suggested after a CUDA out-of-memory


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA (or host) out-of-memory, whichever exception type this torch build raises."""
    oom_type = accelerator().out_of_memory_error
    if isinstance(err, MemoryError) or (oom_type is not None and isinstance(err, oom_type)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def create_app(components: ComponentsArg, config: ServiceConfig) -> Flask:
    """Build the Flask app that serves ``components`` under ``config``.

    Args:
        components: a :class:`~.components.ServiceComponents`, or a ``concurrent.futures.Future``
            resolving to one (the launcher binds the port first and loads the models after;
            ``/ready`` answers 503 until the future is done, 500 if it failed).
        config: limits, token and queueing (:class:`ServiceConfig`). Host/port/device fields
            are used by the launcher, not here.
    """
    state = ServiceState(components, config)
    app = Flask("stepvideo.caption_service")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["stepvideo_service"] = state
    app.before_request(lambda: token_error(config.token))
    app.after_request(_stamp)
    app.register_error_handler(HTTPException, lambda err: _http_error(err, config))
    for route in ROUTES:
        app.add_url_rule(route.path, route.endpoint, _dispatcher(route, state), methods=[route.method])
    return app


def _dispatcher(route: Route, state: ServiceState) -> Callable[[], Response]:
    """The view of ``route``: admission and components for model routes, JSON for every failure."""

    def view() -> Response:
        start = time.perf_counter()
        release = None
        try:
            if route.model is not None:
                release = state.admission.enter()
                resp = route.handler(Call(state, request, state.components(), on_close=release))
            else:
                resp = route.handler(Call(state, request))
        except HTTPException:
            if release is not None:
                release()
            raise
        except BaseException as err:  # noqa: BLE001 - the server must answer every request
            if release is not None:
                release()
            if not isinstance(err, Exception):
                raise
            return _failure(err)
        if release is not None:
            if not resp.direct_passthrough:   # tensor bodies release when the server closes them
                resp.call_on_close(release)
            logger.info("%s %d in %.3f s", request.path, resp.status_code, time.perf_counter() - start)
        return resp

    view.__name__ = route.endpoint
    return view


def _failure(err: Exception) -> Response:
    if isinstance(err, NotReady):
        return error_response(err.status, str(err), LOADING_RETRY_AFTER if err.status == 503 else None)
    if isinstance(err, RequestTooCostly):
        logger.warning("%s refused: %s", request.path, err)
        return error_response(err.status, str(err), **err.details)
    if isinstance(err, ProtocolError):
        return error_response(err.status, str(err))
    if isinstance(err, DeviceBusy):
        return error_response(503, str(err), err.retry_after)
    if is_out_of_memory(err):
        if accelerator().is_available():
            accelerator().empty_cache()
        logger.warning("%s: out of memory (%s); cache emptied", request.path, err)
        return error_response(503, f"out of memory while serving {request.path} ({type(err).__name__}); the "
                                   "cache was emptied, retry later or send a smaller request", OOM_RETRY_AFTER)
    if isinstance(err, ValueError):
        return error_response(400, f"invalid input: {err}")
    return error_response(500, internal_error(logger, request.path))


def token_error(token: Optional[str], hint: str = "--token or STEPVIDEO_SERVICE_TOKEN") -> Optional[Response]:
    """``None`` when the request may pass, else the 401 answer (also used by ``stepvideo.job_server``).

    With ``token`` set, every request must send ``Authorization: Bearer <token>`` (compared in
    constant time); ``hint`` names where the server's token comes from.
    """
    if token is None:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        resp = error_response(401, "missing 'Authorization: Bearer <token>' header: this service requires the "
                                   f"shared token it was started with ({hint})")
    elif not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        resp = error_response(401, "invalid token in the Authorization header")
    else:
        return None
    resp.headers["WWW-Authenticate"] = 'Bearer realm="stepvideo"'
    return resp


def _stamp(resp: Response) -> Response:
    resp.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def http_error_json(err: HTTPException, *, routes: str, max_body_bytes: int, server: str = "service",
                    message: Optional[str] = None) -> Response:
    """``err`` (werkzeug's 404, 405, 413, ...) answered as ``{"error": message}`` with its status and
    headers (such as Allow); also used by ``stepvideo.job_server``. Without ``message``: a 404 lists
    ``routes``, a 413 names the limit ``max_body_bytes`` and ``--max_body_mb``."""
    if message is None:
        message = {404: f"unknown route {request.path[:80]!r}; routes: {routes}",
                   413: f"request body is larger than this {server} accepts ({max_body_bytes} bytes; "
                        "raise it with --max_body_mb)"}.get(err.code, f"{err.name}: {err.description}")
    resp = err.get_response()     # keeps headers such as Allow
    resp.set_data(encode_json(error_body(message)))
    resp.mimetype = JSON_CONTENT_TYPE
    return resp


def _http_error(err: HTTPException, config: ServiceConfig) -> Response:
    message = None
    if err.code == 405:
        route = ROUTES_BY_PATH.get(request.path)
        message = f"method {request.method} is not allowed on {request.path}; use {route.method if route else '?'}"
    return http_error_json(err, routes=route_list(), max_body_bytes=config.max_body_bytes, message=message)

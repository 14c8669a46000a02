"""The generation server's HTTP app (Flask, served by waitress on rank 0).

Routes (the views, one module per group, are in :mod:`.views`)::

    POST   /v1/videos                JSON or multipart (``image``/``input_reference`` upload) -> 202 video
    GET    /v1/videos                ?limit=20&after=<id>&order=desc|asc
    GET    /v1/videos/<id>           the video: status, progress (0-100), stage, settings, timings, error;
                                     ?wait=S holds the answer until the job finishes (at most S s)
    GET    /v1/videos/<id>/content   ?variant=video (mp4) | thumbnail (first frame, JPEG)
    DELETE /v1/videos/<id>           cancel (queued: now; running: at the next step) or delete a finished job
    GET    /v1/models                the held model
    GET    /                         the page in the browser (no token; off with --no_ui)
    GET    /health                   {"status": "alive"}: always, whatever the load (no token)
    GET    /ready                    200 once the DiT is loaded and jobs run; 503 before
    GET    /metrics                  Prometheus text format

Errors under ``/v1/`` are ``{"error": {"message", "type", "param", "code"}}`` (:mod:`.api_errors`).
Status codes: 200, 202 (accepted / cancel requested), 400 malformed, 401 token, 404, 405, 409,
413 body too large, 415 content type, 422 valid but not runnable, 429 (+ ``Retry-After``) queue
full, 503 (+ ``Retry-After``) model still loading.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..caption_service.handlers import error_response
from ..caption_service.incidents import internal_error
from ..caption_service.server import http_error_json, token_error
from . import api_errors
from .config import TOKEN_ENV
from .context import ServingContext
from .views import page, status, videos

__all__ = ["ServingContext", "create_app"]

logger = logging.getLogger(__name__)

_ROUTES = {"/v1/videos": "GET, POST", "/v1/videos/<id>": "GET, DELETE", "/v1/videos/<id>/content": "GET",
           "/v1/models": "GET", "/": "GET", "/health": "GET", "/ready": "GET", "/metrics": "GET"}


def create_app(ctx: ServingContext) -> Flask:
    app = Flask("stepvideo.job_server")
    app.config["MAX_CONTENT_LENGTH"] = ctx.config.max_body_bytes
    config = ctx.config
    public = page.PUBLIC_PATHS if config.ui else ("/health",)

    @app.before_request
    def _check_token():
        if request.path in public:         # liveness probes and the page carry no secrets
            return None
        return token_error(config.token, hint=f"--token or {TOKEN_ENV}")

    @app.after_request
    def _stamp(resp: Response) -> Response:
        resp.headers.setdefault("Cache-Control", "no-store")
        return api_errors.reshape(resp)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        return http_error_json(err, routes=", ".join(_ROUTES), max_body_bytes=config.max_body_bytes,
                               server="server")

    @app.errorhandler(Exception)
    def _internal(err: Exception) -> Response:   # the server answers every request
        return error_response(500, internal_error(logger, f"{request.method} {request.path}"))

    for views in (videos, status, page):
        views.register(app, ctx)
    return app

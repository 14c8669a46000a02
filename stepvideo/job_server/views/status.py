"""Status routes: ``/health`` (no token, whatever the load), ``/ready``, ``/metrics``, ``/v1/models``."""
from __future__ import annotations

import time

from flask import Flask, Response

from ...caption_service.handlers import json_response
from .. import jobs as js
from ..api_errors import api_error
from ..context import ServingContext
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from . import add_route
from .videos import LOADING_RETRY_AFTER


def register(app: Flask, ctx: ServingContext) -> None:
    add_route(app, "/health", health, ctx, ["GET"])
    add_route(app, "/ready", ready, ctx, ["GET"])
    add_route(app, "/metrics", metrics, ctx, ["GET"])
    add_route(app, "/v1/models", models, ctx, ["GET"])


def health(ctx: ServingContext) -> Response:
    return json_response({"status": "alive", "ready": ctx.model is not None})


def ready(ctx: ServingContext) -> Response:
    if ctx.model is None:
        return json_response({"ready": False, "error": "the model is still loading"}, 503, LOADING_RETRY_AFTER)
    config = ctx.config
    counts = ctx.store.counts()
    return json_response({
        "ready": True, "server": "stepvideo generation server", "model": ctx.model.name, **ctx.model_summary,
        "queue": {"queued": counts[js.QUEUED], "in_progress": counts[js.IN_PROGRESS],
                  "max_queue": config.max_queue},
        "limits": {"max_steps": config.max_steps, "max_tokens": config.max_tokens,
                   "max_prompt_chars": config.max_prompt_chars, "max_body_bytes": config.max_body_bytes},
        "defaults": {k: v for k, v in ctx.server_options.items() if v is not None},
        "auth": config.token is not None, "uptime_seconds": round(time.time() - ctx.started, 1)})


def metrics(ctx: ServingContext) -> Response:
    return Response(ctx.metrics.render(), mimetype=None, content_type=METRICS_CONTENT_TYPE)


def models(ctx: ServingContext) -> Response:
    """The one model this server holds (OpenAI ``GET /v1/models`` shape)."""
    if ctx.model is None:
        return api_error(503, "the model is still loading; poll GET /ready", retry_after=LOADING_RETRY_AFTER)
    return json_response({"object": "list", "data": [{"id": ctx.model.name, "object": "model",
                                                      "created": int(ctx.started), "owned_by": "stepvideo",
                                                      "ti2v": ctx.model.is_ti2v}]})

"""``GET /``: the page in the browser (``ui/index.html``: one self-contained file, no CDN, no
build step). Like ``/health`` it needs no token; every API call it makes sends one. Off with
``--no_ui``."""
from __future__ import annotations

from importlib import resources

from flask import Flask, Response

from ..context import ServingContext
from . import add_route

PAGE = ("stepvideo.job_server", "ui/index.html")
PUBLIC_PATHS = ("/health", "/")          # the only routes answered without a token


def register(app: Flask, ctx: ServingContext) -> None:
    if ctx.config.ui:
        add_route(app, "/", index, ctx, ["GET"])


def index(ctx: ServingContext) -> Response:
    html = resources.files(PAGE[0]).joinpath(PAGE[1]).read_bytes()
    resp = Response(html, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                               "style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
                                               "media-src 'self' blob:")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp

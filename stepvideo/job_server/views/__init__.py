"""The generation server's routes, one module per group; each has ``register(app, ctx)``.

- :mod:`.videos`  ``/v1/videos``: create, list, retrieve, content (video, thumbnail), cancel/delete;
- :mod:`.status`  ``/health``, ``/ready``, ``/metrics``, ``/v1/models``;
- :mod:`.page`    ``/``: the page in the browser (off with ``--no_ui``).
"""
from __future__ import annotations

from typing import Callable, Iterable

from flask import Flask


def add_route(app: Flask, rule: str, view: Callable, ctx, methods: Iterable[str]) -> None:
    """``view(ctx, **url_values)`` answers ``methods`` on ``rule``."""
    def endpoint(**values):
        return view(ctx, **values)

    app.add_url_rule(rule, endpoint=view.__name__, view_func=endpoint, methods=list(methods))

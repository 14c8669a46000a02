"""The route table: the one list that drives the URL rules, the 404/405 messages and ``/ready``.

Each row names the method, the path, the handler (:mod:`.handlers`), the model it needs
(``"caption"``, ``"vae"``, or None for status routes) and its key in the ``/ready`` listing.
Rows with a model are *model routes*: they need the loaded components, count against the
admission limit (503 + Retry-After beyond ``--threads``) and run their model call through the
device gate. Status routes never wait for either.

A new endpoint is one handler, one row here and one client method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from flask import Response

from . import handlers


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[["handlers.Call"], Response]
    model: Optional[str]            # "caption" / "vae": a model route; None: a status route
    ready_key: Optional[str]        # name in /ready's "routes" listing (None: not listed)
    summary: str

    @property
    def endpoint(self) -> str:
        return self.handler.__name__


ROUTES = (
    Route("POST", "/caption-api", handlers.caption, "caption", "caption",
          "JSON {prompts} -> tensors y, y_mask, clip_embedding"),
    Route("POST", "/vae-api", handlers.vae_decode, "vae", "vae_decode",
          "tensors {samples [B, F, z, h, w]}, option output -> tensors {video [B, T, 3, H, W]}"),
    Route("POST", "/vae-encode-api", handlers.vae_encode, "vae", "vae_encode",
          "tensors {videos [B, T, 3, H, W]}, options mode, seed -> tensors {latents [B, F, z, h, w]}"),
    Route("GET", "/health", handlers.health, None, None, '{"status": "alive", "ready": bool}'),
    Route("GET", "/ready", handlers.ready, None, None, "models, devices, dtypes, limits, versions; 503 while loading"),
)

ROUTES_BY_PATH: Dict[str, Route] = {r.path: r for r in ROUTES}


def route_list() -> str:
    """``"GET /health, GET /ready, POST /caption-api, ..."`` for messages."""
    return ", ".join(f"{r.method} {r.path}" for r in sorted(ROUTES, key=lambda r: r.path))

"""Error answers of the generation server: the one place their JSON is built.

Under ``/v1/`` every 4xx/5xx is ``{"error": {"message", "type", "param", "code"}}``, the shape
the OpenAI SDK and other OpenAI-style clients read (``param``: the request field at fault, or
null). Answers built by helpers shared with the caption/VAE service (the token check, werkzeug's
404/405/413) come as ``{"error": "text"}`` and are re-shaped by :func:`reshape`, installed as an
``after_request`` hook; the caption/VAE service itself keeps its own shape. ``/health``,
``/ready`` and ``/metrics`` answer as before.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

from flask import Response, request

from ..caption_service.handlers import json_response
from ..caption_service.protocol import encode_json

API_PREFIX = "/v1/"
# status -> (type, code) when the caller names none
_KINDS = {400: ("invalid_request_error", "invalid_value"), 401: ("authentication_error", "invalid_api_key"),
          403: ("permission_error", "forbidden"), 404: ("invalid_request_error", "not_found"),
          405: ("invalid_request_error", "method_not_allowed"), 409: ("invalid_request_error", "conflict"),
          413: ("invalid_request_error", "body_too_large"), 415: ("invalid_request_error", "unsupported_media_type"),
          422: ("invalid_request_error", "unprocessable_value"), 429: ("rate_limit_error", "queue_full"),
          503: ("server_error", "model_loading")}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` for an answer with ``status``."""
    kind, default_code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                             "internal_error" if status >= 500 else "error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def api_error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
              retry_after: Optional[int] = None) -> Response:
    """An error answer of a ``/v1/`` route."""
    return json_response(error_body(status, message, param, code), status, retry_after)


def reshape(resp: Response) -> Response:
    """``after_request``: a ``/v1/`` error still in the ``{"error": "text", "field": ...}`` shape
    (built by a shared helper) gets the OpenAI shape; headers (Allow, Retry-After,
    WWW-Authenticate) stay."""
    if resp.status_code < 400 or not request.path.startswith(API_PREFIX) or resp.mimetype != "application/json":
        return resp
    try:
        body = json.loads(resp.get_data())
    except ValueError:
        return resp
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return resp
    resp.set_data(encode_json(error_body(resp.status_code, body["error"], body.get("field"))))
    return resp

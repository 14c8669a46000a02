"""The error answers of both HTTP apps (the caption/VAE service and the job server): built here,
read here.

Servers answer an error as JSON ``{"error": "<one line>", ...details}``; :func:`error_body` builds
it. Under ``/v1/`` the job server reshapes it into the OpenAI form ``{"error": {"message", "type",
"param", "code"}}`` (:mod:`stepvideo.job_server.api_errors`). Clients turn any error answer
into its message with :func:`read_error`, whatever came back (JSON, an HTML page of a proxy,
nothing).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

JSON_CONTENT_TYPE = "application/json"
EXCERPT_CHARS = 300


def media_type(content_type: Optional[str]) -> str:
    """``"application/json; charset=utf-8"`` -> ``"application/json"`` (lower case, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def error_body(message: str, **details: Any) -> Dict[str, Any]:
    """``{"error": message, **details}`` (details with a ``None`` value are left out)."""
    return {"error": message, **{k: v for k, v in details.items() if v is not None}}


def error_message(body: Any) -> Optional[str]:
    """The text of a parsed error answer (or a job's ``error``): ``{"error": {"message": ...}}``
    (the job server's ``/v1/`` routes) or ``{"error": "..."}`` (``/ready``, the caption/VAE service)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("message")
    return error


def read_error(body: bytes, content_type: str = "", fallback: str = "") -> Tuple[str, Dict[str, Any]]:
    """``(message, JSON object)`` of an error answer: the ``"error"`` text of a JSON body, else
    ``fallback`` (e.g. the HTTP reason) for JSON without one, else a short excerpt of the body."""
    if media_type(content_type) == JSON_CONTENT_TYPE:
        try:
            obj = json.loads(body.decode("utf-8"))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            message = error_message(obj)
            if isinstance(message, str):
                return message, obj
            if fallback:
                return fallback, obj
    text = " ".join(body[:EXCERPT_CHARS].decode("utf-8", errors="replace").split())
    return text or fallback or "(empty body)", {"error": text}

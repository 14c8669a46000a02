"""The generation server's HTTP API (Flask, served by waitress on rank 0).

Routes (errors are ``{"error": "...", "field": ...}``)::

    POST   /v1/videos                JSON or multipart (``image`` upload) -> 202 job
    GET    /v1/videos                ?limit=20&after=<id>: jobs, newest first
    GET    /v1/videos/<id>           the job: status, progress, stage, settings, timings, error;
                                     ?wait=S holds the answer until the job finishes (at most S s)
    GET    /v1/videos/<id>/content   video/mp4 of a completed job (404 unknown, 409 not completed)
    DELETE /v1/videos/<id>           cancel (queued: now; running: at the next step) or delete a finished job
    GET    /health                   {"status": "alive"}: always, whatever the load
    GET    /ready                    200 once the DiT is loaded and jobs run; 503 before
    GET    /metrics                  Prometheus text format

Status codes: 200, 202 (accepted / cancel requested), 400 malformed, 401 token, 404, 405, 409,
413 body too large, 415 content type, 422 valid but not runnable, 429 (+ ``Retry-After``) queue
full, 503 (+ ``Retry-After``) model still loading.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from flask import Flask, Response, request, send_file
from werkzeug.exceptions import HTTPException

from ..service.handlers import error_response as _error
from ..service.handlers import json_response as _json_response
from ..service.incidents import internal_error
from ..service.server import http_error_json, token_error
from . import jobs as js
from .config import TOKEN_ENV, ServerConfig
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .requests import ModelInfo, RequestError, build_job, read_form_body, read_json_body

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER = 10
MAX_LIST = 100
MAX_WAIT = 60.0         # seconds a GET /v1/videos/<id>?wait= may hold its request
_ROUTES = {"/v1/videos": "GET, POST", "/v1/videos/<id>": "GET, DELETE", "/v1/videos/<id>/content": "GET",
           "/health": "GET", "/ready": "GET", "/metrics": "GET"}


@dataclass
class ServingContext:
    """Everything the routes share. ``model`` is set once the DiT is loaded (``/ready`` turns 200)."""

    store: js.JobStore
    config: ServerConfig
    metrics: ServerMetrics
    dispatcher: Any                              # worker.Dispatcher
    server_options: Dict[str, Any] = field(default_factory=dict)   # sampling flags of the launch
    model: Optional[ModelInfo] = None
    model_summary: Dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    _job_seconds: float = 60.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: threading.Condition = field(default_factory=threading.Condition)
    _waiters: Optional[threading.BoundedSemaphore] = None

    def __post_init__(self):
        # long polls may hold all but 2 HTTP threads: /health and short requests always find one
        self._waiters = threading.BoundedSemaphore(max(1, self.config.threads - 2))

    def job_finished(self) -> None:
        """Wake the long polls (``GET /v1/videos/<id>?wait=S``)."""
        with self._finished:
            self._finished.notify_all()

    def wait_finished(self, job_id: str, seconds: float) -> Optional[js.Job]:
        """The job once it is finished, or after ``seconds``; no wait when every long-poll slot is taken."""
        job = self.store.get(job_id)
        if job is None or job.status in js.FINISHED or seconds <= 0 or not self._waiters.acquire(blocking=False):
            return job
        try:
            deadline = time.monotonic() + seconds
            with self._finished:
                while job is not None and job.status not in js.FINISHED:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._finished.wait(min(left, 1.0))
                    job = self.store.get(job_id)
            return job
        finally:
            self._waiters.release()

    def note_job_seconds(self, seconds: float) -> None:
        with self._lock:
            self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds if self._job_seconds else seconds

    def retry_after(self, queued: int) -> int:
        """Seconds until a queue slot is likely free: about one job."""
        return max(1, int(self._job_seconds + 0.999))


def _job_json(ctx: ServingContext, job: js.Job) -> Dict[str, Any]:
    out = job.to_api()
    position = ctx.store.queue_position(job)
    if position is not None:
        out["queue_position"] = position
    return out


def _request_error(err: RequestError) -> Response:
    body = {"error": str(err)}
    if err.field is not None:
        body["field"] = err.field
    return _json_response(body, err.status)


def create_app(ctx: ServingContext) -> Flask:
    app = Flask("stepvideo.serving")
    app.config["MAX_CONTENT_LENGTH"] = ctx.config.max_body_bytes
    store, config = ctx.store, ctx.config

    @app.before_request
    def _check_token():
        if request.path == "/health":        # liveness probes carry no secrets
            return None
        return token_error(config.token, hint=f"--token or {TOKEN_ENV}")

    @app.after_request
    def _stamp(resp: Response) -> Response:
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        return http_error_json(err, routes=", ".join(_ROUTES), max_body_bytes=config.max_body_bytes,
                               server="server")

    @app.errorhandler(Exception)
    def _internal(err: Exception) -> Response:   # the server answers every request
        return _error(500, internal_error(logger, f"{request.method} {request.path}"))

    # -- jobs -----------------------------------------------------------------------------
    @app.post("/v1/videos")
    def create_video():
        if ctx.model is None:
            return _error(503, "the model is still loading; poll GET /ready", LOADING_RETRY_AFTER)
        try:
            fields = _read_fields()
            job_request = build_job(fields, ctx.server_options, ctx.model, config)
        except RequestError as err:
            return _request_error(err)
        try:
            job = store.add(job_request.prompt, job_request.settings(), job_request.image, config.max_queue)
        except js.QueueFull as err:
            return _error(429, f"{err} (--max_queue {config.max_queue})", ctx.retry_after(err.queued))
        ctx.dispatcher.notify()
        sampling = job_request.sampling
        logger.info("queued %s: %d steps, %d frames at %dx%d, seed %d", job.id, sampling.num_inference_steps,
                    sampling.num_frames, sampling.height, sampling.width, sampling.seed)
        resp = _json_response(_job_json(ctx, job), 202)
        resp.headers["Location"] = f"/v1/videos/{job.id}"
        return resp

    @app.get("/v1/videos")
    def list_videos():
        raw = request.args.get("limit", "20")
        try:
            limit = int(raw)
        except ValueError:
            return _json_response({"error": f"query 'limit' must be an integer, got {raw!r}", "field": "limit"}, 400)
        if not 1 <= limit <= MAX_LIST:
            return _json_response({"error": f"query 'limit' must be in [1, {MAX_LIST}], got {limit}",
                                   "field": "limit"}, 400)
        after = request.args.get("after") or None
        try:
            rows, has_more = store.list(limit, after)
        except KeyError:
            return _json_response({"error": f"query 'after': no job {after!r}", "field": "after"}, 404)
        data = [_job_json(ctx, job) for job in rows]
        return _json_response({"object": "list", "data": data, "has_more": has_more,
                               "first_id": data[0]["id"] if data else None,
                               "last_id": data[-1]["id"] if data else None})

    @app.get("/v1/videos/<job_id>")
    def get_video(job_id: str):
        raw = request.args.get("wait", "0")
        try:
            wait = float(raw)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT:
            return _json_response({"error": f"query 'wait' must be seconds in [0, {MAX_WAIT}], got {raw!r}",
                                   "field": "wait"}, 400)
        job = ctx.wait_finished(job_id, wait)
        if job is None:
            return _error(404, f"no job {job_id!r}")
        return _json_response(_job_json(ctx, job))

    @app.get("/v1/videos/<job_id>/content")
    def get_content(job_id: str):
        job = store.get(job_id)
        if job is None:
            return _error(404, f"no job {job_id!r}")
        if job.status != js.COMPLETED:
            detail = f": {job.error}" if job.error else ""
            return _error(409, f"job {job_id} is {job.status}{detail}; its video is available once it is completed")
        path = store.video_path(job_id)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:          # deleted between the two lines above
            return _error(404, f"no job {job_id!r}")
        return send_file(handle, mimetype="video/mp4", as_attachment=False, download_name=f"{job_id}.mp4",
                         conditional=True, etag=False, last_modified=job.completed_at)

    @app.delete("/v1/videos/<job_id>")
    def delete_video(job_id: str):
        job = store.get(job_id)
        if job is None:
            return _error(404, f"no job {job_id!r}")
        if job.status in js.FINISHED:
            if store.delete(job_id):
                return _json_response({"id": job_id, "object": "video.deleted", "deleted": True})
            job = store.get(job_id)            # it changed meanwhile: fall through with the new state
            if job is None:
                return _error(404, f"no job {job_id!r}")
        job = store.cancel(job_id)
        if job is None:
            return _error(404, f"no job {job_id!r}")
        ctx.job_finished()
        if job.status == js.IN_PROGRESS:
            ctx.dispatcher.request_cancel(job_id)
            return _json_response(_job_json(ctx, job), 202)    # stops at the next step boundary
        return _json_response(_job_json(ctx, job))

    # -- status ---------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return _json_response({"status": "alive", "ready": ctx.model is not None})

    @app.get("/ready")
    def ready():
        if ctx.model is None:
            return _json_response({"ready": False, "error": "the model is still loading"}, 503, LOADING_RETRY_AFTER)
        counts = store.counts()
        return _json_response({
            "ready": True, "server": "stepvideo generation server", **ctx.model_summary,
            "queue": {"queued": counts[js.QUEUED], "in_progress": counts[js.IN_PROGRESS],
                      "max_queue": config.max_queue},
            "limits": {"max_steps": config.max_steps, "max_tokens": config.max_tokens,
                       "max_prompt_chars": config.max_prompt_chars, "max_body_bytes": config.max_body_bytes},
            "defaults": {k: v for k, v in ctx.server_options.items() if v is not None},
            "auth": config.token is not None, "uptime_seconds": round(time.time() - ctx.started, 1)})

    @app.get("/metrics")
    def metrics():
        return Response(ctx.metrics.render(), mimetype=None, content_type=METRICS_CONTENT_TYPE)

    return app


def _read_fields() -> Dict[str, Any]:
    """The request's fields from a JSON or a multipart body."""
    kind = (request.mimetype or "").lower()
    if kind == "application/json":
        fields = read_json_body(request.get_data(cache=False))
        if not isinstance(fields, dict):
            raise RequestError(f"the body must be a JSON object, got {type(fields).__name__}")
        return fields
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return read_form_body(request)
    raise RequestError(f"Content-Type must be application/json or multipart/form-data (or a url-encoded form), "
                       f"got {kind or 'none'}",
                       status=415)

"""``/v1/videos``: queue, list, retrieve, download and cancel/delete jobs.

    POST   /v1/videos                JSON or multipart (``image``/``input_reference`` upload) -> 202 video
    GET    /v1/videos                ?limit=20&after=<id>&order=desc|asc
    GET    /v1/videos/<id>           the video object; ?wait=S holds the answer until it finishes (at most S s)
    GET    /v1/videos/<id>/content   ?variant=video (mp4) | thumbnail (first frame, JPEG; WebP with
                                     ?format=webp); 404 unknown, 409 not completed
    DELETE /v1/videos/<id>           cancel (queued: now; running: at the next step) or delete a finished job
"""
from __future__ import annotations

import logging
from typing import Any, Dict

from flask import Flask, Response, request, send_file

from ...caption_service.handlers import json_response
from .. import jobs as js
from .. import openai_fields
from ..api_errors import api_error
from ..context import ServingContext
from ..requests import RequestError, build_job, parse_form, read_form_parts, read_json_body
from ..thumbnail import FORMATS, first_frame_image
from ..video_object import video_object
from . import add_route

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER = 10
MAX_LIST = 100
MAX_WAIT = 60.0         # seconds a GET /v1/videos/<id>?wait= may hold its request
VARIANTS = ("video", "thumbnail")


def register(app: Flask, ctx: ServingContext) -> None:
    add_route(app, "/v1/videos", create_video, ctx, ["POST"])
    add_route(app, "/v1/videos", list_videos, ctx, ["GET"])
    add_route(app, "/v1/videos/<job_id>", get_video, ctx, ["GET"])
    add_route(app, "/v1/videos/<job_id>", delete_video, ctx, ["DELETE"])
    add_route(app, "/v1/videos/<job_id>/content", get_content, ctx, ["GET"])


def model_name(ctx: ServingContext) -> str:
    return ctx.model.name if ctx.model is not None else (ctx.config.served_model_name or "stepvideo")


def job_json(ctx: ServingContext, job: js.Job) -> Dict[str, Any]:
    return video_object(job, model_name(ctx), ctx.store.queue_position(job))


def _answer(ctx: ServingContext, job: js.Job, status: int = 200) -> Response:
    """The video object; an unfinished one carries ``openai-poll-after-ms`` (the SDK's ``poll`` follows it)."""
    resp = json_response(job_json(ctx, job), status)
    if job.status not in js.FINISHED:
        resp.headers["openai-poll-after-ms"] = str(ctx.poll_after_ms(job))
    return resp


def _no_job(job_id: str) -> Response:
    return api_error(404, f"no video {job_id!r}", code="video_not_found")


def create_video(ctx: ServingContext) -> Response:
    config = ctx.config
    if ctx.model is None:
        return api_error(503, "the model is still loading; poll GET /ready", retry_after=LOADING_RETRY_AFTER)
    try:
        shared = openai_fields.to_native(_read_fields(), ctx.model.name)
        try:
            job_request = build_job(shared.fields, ctx.server_options, ctx.model, config)
        except RequestError as err:
            raise openai_fields.blame_sent_field(err, shared.sent_as) from None
    except RequestError as err:
        return api_error(err.status, str(err), err.field)
    settings = {**job_request.settings(), "fps": shared.fps, "model": ctx.model.name}
    try:
        job = ctx.store.add(job_request.prompt, settings, job_request.image, config.max_queue)
    except js.QueueFull as err:
        return api_error(429, f"{err} (--max_queue {config.max_queue})", retry_after=ctx.retry_after(err.queued))
    ctx.dispatcher.notify()
    sampling = job_request.sampling
    logger.info("queued %s: %d steps, %d frames at %dx%d, seed %d", job.id, sampling.num_inference_steps,
                sampling.num_frames, sampling.height, sampling.width, sampling.seed)
    resp = _answer(ctx, job, 202)
    resp.headers["Location"] = f"/v1/videos/{job.id}"
    return resp


def list_videos(ctx: ServingContext) -> Response:
    raw = request.args.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        return api_error(400, f"query 'limit' must be an integer, got {raw!r}", "limit")
    if not 1 <= limit <= MAX_LIST:
        return api_error(400, f"query 'limit' must be in [1, {MAX_LIST}], got {limit}", "limit")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        return api_error(400, f"query 'order' must be 'asc' or 'desc', got {order!r}", "order")
    after = request.args.get("after") or None
    try:
        rows, has_more = ctx.store.list(limit, after, newest_first=order == "desc")
    except KeyError:
        return api_error(404, f"query 'after': no video {after!r}", "after", code="video_not_found")
    data = [job_json(ctx, job) for job in rows]
    return json_response({"object": "list", "data": data, "has_more": has_more,
                          "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


def get_video(ctx: ServingContext, job_id: str) -> Response:
    raw = request.args.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        return api_error(400, f"query 'wait' must be seconds in [0, {MAX_WAIT}], got {raw!r}", "wait")
    job = ctx.wait_finished(job_id, wait)
    return _no_job(job_id) if job is None else _answer(ctx, job)


def get_content(ctx: ServingContext, job_id: str) -> Response:
    variant = request.args.get("variant", "video")
    if variant not in VARIANTS:
        return api_error(400, f"query 'variant' must be one of {list(VARIANTS)}, got {variant!r}", "variant")
    fmt = request.args.get("format", "jpeg")
    if variant == "thumbnail" and fmt not in FORMATS:
        return api_error(400, f"query 'format' must be one of {list(FORMATS)}, got {fmt!r}", "format")
    job = ctx.store.get(job_id)
    if job is None:
        return _no_job(job_id)
    if job.status != js.COMPLETED:
        detail = f": {job.error}" if job.error else ""
        return api_error(409, f"video {job_id} is {job.status}{detail}; its content is available once it is "
                              "completed", code="video_not_ready")
    path = ctx.store.video_path(job_id)
    try:
        if variant == "thumbnail":
            return Response(first_frame_image(path, fmt), mimetype=FORMATS[fmt][1])
        handle = open(path, "rb")
    except FileNotFoundError:          # deleted between the two lines above
        return _no_job(job_id)
    return send_file(handle, mimetype="video/mp4", as_attachment=False, download_name=f"{job_id}.mp4",
                     conditional=True, etag=False, last_modified=job.completed_at)


def delete_video(ctx: ServingContext, job_id: str) -> Response:
    store = ctx.store
    job = store.get(job_id)
    if job is None:
        return _no_job(job_id)
    if job.status in js.FINISHED:
        if store.delete(job_id):
            return json_response({"id": job_id, "object": "video.deleted", "deleted": True})
        job = store.get(job_id)            # it changed meanwhile: fall through with the new state
        if job is None:
            return _no_job(job_id)
    job = store.cancel(job_id)
    if job is None:
        return _no_job(job_id)
    ctx.job_finished()
    if job.status == js.IN_PROGRESS:
        ctx.dispatcher.request_cancel(job_id)
        return _answer(ctx, job, 202)    # stops at the next step boundary
    return _answer(ctx, job)


def _read_fields() -> Dict[str, Any]:
    """The request's fields from a JSON or a multipart body (file parts: ``image``, ``input_reference``)."""
    kind = (request.mimetype or "").lower()
    if kind == "application/json":
        fields = read_json_body(request.get_data(cache=False))
        if not isinstance(fields, dict):
            raise RequestError(f"the body must be a JSON object, got {type(fields).__name__}")
        return fields
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form, uploads = read_form_parts(request)
        shared = openai_fields.parse_form_values(form)
        own = {k: v for k, v in form.items() if k not in shared and k != "input_reference[image_url]"}
        fields = parse_form(own, uploads.get("image"))
        if "input_reference" in uploads:
            shared["input_reference"] = uploads["input_reference"]
        return {**fields, **shared}
    raise RequestError(f"Content-Type must be application/json or multipart/form-data (or a url-encoded form), "
                       f"got {kind or 'none'}",
                       status=415)

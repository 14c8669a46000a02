"""A job as the API shows it: the shared video object, plus our extras.

Shared (OpenAI ``Video``): ``id``, ``object: "video"``, ``model``, ``status``, ``created_at``,
``completed_at``, ``expires_at`` (null: videos are kept until deleted), ``prompt``,
``remixed_from_video_id`` (null), ``progress`` (an integer percent that never goes down; 100
only once completed), ``seconds`` and ``size`` as the job runs them, ``error`` ``{code,
message}`` or null. Ours: ``started_at``, ``stage``, ``settings``, ``timings``,
``queue_position``, ``cancel_requested``, ``attempts``, ``content_url``/``size_bytes`` when
completed, and the ``cancelled`` status.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from . import jobs as js
from .openai_fields import DEFAULT_FPS, video_seconds

FAILED_CODE = "generation_failed"


def percent(progress: float, status: str) -> int:
    """Store progress in [0, 1] -> 0..100, floored (monotone like the store's value); 100 only
    when completed."""
    if status == js.COMPLETED:
        return 100
    return min(99, int(math.floor(progress * 100 + 1e-9)))


def video_object(job: js.Job, model_name: str, queue_position: Optional[int] = None) -> Dict[str, Any]:
    """``model_name``: the held model's id, for jobs that do not record theirs (queued before it existed)."""
    settings = job.settings
    out = job.to_api()
    out.update(model=settings.get("model", model_name), progress=percent(job.progress, job.status), expires_at=None,
               remixed_from_video_id=None,
               error=None if job.error is None else {"code": FAILED_CODE, "message": job.error})
    if "num_frames" in settings:
        out["seconds"] = video_seconds(settings["num_frames"], settings.get("fps", DEFAULT_FPS))
    if "width" in settings and "height" in settings:
        out["size"] = f"{settings['width']}x{settings['height']}"
    if queue_position is not None:
        out["queue_position"] = queue_position
    return out

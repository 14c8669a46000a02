"""``ServingContext``: what every route of the generation server shares (store, limits, model, workers)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import jobs as js
from .config import ServerConfig
from .metrics import ServerMetrics
from .requests import ModelInfo

MIN_POLL_MS, MAX_POLL_MS = 250, 5000      # the ``openai-poll-after-ms`` advice stays in this range


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

    def poll_after_ms(self, job: js.Job) -> int:
        """When to ask again about an unfinished job: about a twentieth of a job's time, more
        for a job further back in the queue."""
        position = self.store.queue_position(job) or 0
        estimate = self._job_seconds * 1000.0 / 20.0 * (1 + position)
        return int(min(MAX_POLL_MS, max(MIN_POLL_MS, estimate)))

"""The loop every rank runs in its main thread: one job at a time, all ranks together.

Rank 0 (which also serves HTTP in waitress threads) takes the oldest queued job from the
store and broadcasts its settings over a gloo *control group*; the other ranks wait in that
broadcast. Then every rank calls ``VideoGenerator.generate`` for the job. After each
denoising step, rank 0 broadcasts its cancel flag on the control group, so a cancelled job
stops on every rank at the same step boundary.

When idle, rank 0 sends a heartbeat every :data:`HEARTBEAT_S` seconds, so the other ranks'
wait never reaches the process group's timeout, however long the server sits idle.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import OutputConfig, SamplingConfig
from ..errors import GenerationCancelled
from ..io.image import to_rgb
from ..timing import StageTimer
from .jobs import CANCELLED, COMPLETED, FAILED, Job, JobStore

logger = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
JOB_ONLY_SETTINGS = ("preset", "image", "fps", "model", "prompt_tokens")     # job settings that are not SamplingConfig fields
CONTROL_TIMEOUT = timedelta(seconds=30 * 60)


class Dispatcher:
    """Rank 0's hand-off between the HTTP threads (notify, cancel) and the worker loop."""

    def __init__(self, store: JobStore):
        self.store = store
        self._cond = threading.Condition()
        self._stopping = False
        self._current: Optional[str] = None
        self._cancel = threading.Event()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def next_job(self, timeout: float) -> Optional[Job]:
        """The next job (now ``in_progress``), or ``None`` after ``timeout`` s or on stop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stopping:
                job = self.store.claim_next()
                if job is not None:
                    self._current = job.id
                    self._cancel.clear()
                    if job.cancel_requested:
                        self._cancel.set()
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))      # also polls: a job added by anything else is seen
        return None

    def request_cancel(self, job_id: str) -> None:
        if self._current == job_id:
            self._cancel.set()

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> None:
        self._current = None
        self._cancel.clear()


class ControlChannel:
    """Small messages from rank 0 to every rank on a CPU (gloo) group of its own."""

    def __init__(self, state):
        self.state = state
        self.group = None
        if state.distributed:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)   # collective

    def send(self, message: Any) -> Any:
        """Rank 0's ``message`` on every rank."""
        if not self.state.distributed:
            return message
        import torch.distributed as dist

        box = [message if self.state.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def flag(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank (one int on the wire)."""
        if not self.state.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([1 if (value and self.state.is_main) else 0], dtype=torch.int32)
        dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())


def _progress(stage: str, done: int, total: int):
    """(progress in [0, 1], stage label) for a timer event."""
    if stage == "encoding":
        return 0.02, "encoding"
    if stage == "denoising":
        return 0.05 + 0.85 * (done / max(total, 1)), f"denoising {done}/{total}"
    if stage == "decoding":
        return 0.92, "decoding"
    return 0.97, "writing"


def serve_jobs(generator, state, channel: ControlChannel, output: OutputConfig, ctx=None) -> None:
    """Run jobs until rank 0's dispatcher stops. ``ctx`` (a ``ServingContext``) on rank 0 only."""
    while True:
        message = None
        if state.is_main:
            job = ctx.dispatcher.next_job(HEARTBEAT_S)
            if ctx.dispatcher.stopping:
                message = {"kind": "stop"}
            elif job is None or not _runnable(job, ctx):      # a job that cannot run failed alone
                message = {"kind": "idle"}
            else:
                message = {"kind": "job", "id": job.id, "prompt": job.prompt, "settings": job.settings}
        message = channel.send(message)
        if message["kind"] == "stop":
            return
        if message["kind"] == "idle":
            continue
        run_job(generator, state, channel, output, message, ctx)


def _runnable(job: Job, ctx) -> bool:
    """Rank 0: the stored settings build a ``SamplingConfig``; else the job fails (logged under its
    id) and the server goes on with the next one."""
    problem = job.damaged
    if problem is None:
        try:
            _sampling(job.settings)
        except (TypeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
    if problem is None:
        return True
    logger.error("job %s cannot run: its stored settings do not fit this server version: %s", job.id, problem)
    ctx.store.finish(job.id, FAILED, error="the job's stored settings cannot be run by this server version; "
                                              "submit it again")
    ctx.dispatcher.done()
    ctx.job_finished()
    return False


def _sampling(settings: Dict[str, Any]) -> SamplingConfig:
    return SamplingConfig(**{k: v for k, v in settings.items() if k not in JOB_ONLY_SETTINGS})


def _client_error(job_id: str, stage: Optional[str]) -> str:
    """What the client reads on a failed job: the stage, never the exception (it names server
    paths and service URLs); the log line has it under the job id."""
    return f"the job failed while {stage or 'starting'}; the server log has the details under {job_id}"


def run_job(generator, state, channel: ControlChannel, output: OutputConfig, message: Dict[str, Any], ctx) -> None:
    """One job on every rank; rank 0 records the outcome."""
    job_id = message["id"]
    settings = message["settings"]
    sampling = _sampling(settings)
    listener = None
    first_image = None
    if state.is_main:
        store = ctx.store

        def record_progress(stage: str, done: int, total: int) -> None:   # live progress, stage and timings so far
            try:
                store.set_progress(job_id, *_progress(stage, done, total), timings=timer.as_dict())
            except Exception as err:  # noqa: BLE001 - rank 0 alone must never leave the loop mid-step
                logger.warning("job %s: progress not recorded (%s: %s)", job_id, type(err).__name__, err)

        listener = record_progress
        image_error = None
        if settings.get("image"):
            try:
                from PIL import Image

                first_image, _ = to_rgb(Image.open(io.BytesIO(store.image(job_id))))   # 16-bit, CMYK, ...
            except Exception as err:  # noqa: BLE001 - checked at submission; reported on the job if it happens
                logger.error("job %s: the stored first image cannot be read: %s: %s", job_id, type(err).__name__, err)
                image_error = "the stored first image cannot be read"
    if settings.get("image") and channel.flag(state.is_main and image_error is not None):   # all ranks skip it
        if state.is_main:
            ctx.store.finish(job_id, FAILED, error=image_error)
            ctx.dispatcher.done()
            ctx.job_finished()
        return
    timer = StageTimer(listener=listener)
    job_output = replace(output, save_path=str(_videos_dir(ctx, state)), output_file_name=job_id,
                         output_path=str(_videos_dir(ctx, state) / f"{job_id}.mp4"), fps=settings.get("fps", output.fps))

    def should_cancel(step: int) -> bool:        # a cancel, or the server stopping
        return channel.flag(state.is_main and (ctx.dispatcher.cancel_requested() or ctx.dispatcher.stopping))

    start = time.perf_counter()
    status, error = COMPLETED, None
    try:
        generator.generate(message["prompt"], sampling, job_output, first_image=first_image, progress=False,
                           timer=timer, should_cancel=should_cancel)
    except GenerationCancelled:
        status = CANCELLED
    except Exception as err:  # noqa: BLE001 - recorded on the job; the server goes on
        status = FAILED
        if state.is_main:
            logger.error("job %s failed: %s: %s", job_id, type(err).__name__, err)
            job = ctx.store.get(job_id)
            error = _client_error(job_id, job.stage if job is not None else None)
    if not state.is_main:
        return
    seconds = time.perf_counter() - start
    timings = timer.as_dict()
    if status == CANCELLED and not ctx.dispatcher.cancel_requested():      # stopped by a shutdown
        ctx.store.requeue(job_id)
        ctx.dispatcher.done()
        logger.info("job %s interrupted by the shutdown; re-queued", job_id)
        return
    ctx.store.finish(job_id, status, timings=timings, error=error)
    ctx.dispatcher.done()
    ctx.job_finished()
    ctx.metrics.job_finished(status, timings, seconds)
    if status == COMPLETED:
        ctx.note_job_seconds(seconds)
    logger.info("job %s %s in %.2f s; %s", job_id, status, seconds, timings["summary"])


def _videos_dir(ctx, state) -> Path:
    # only rank 0 writes files; the other ranks never use this path
    return ctx.store.videos_dir if state.is_main else Path(".")

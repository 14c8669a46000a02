"""Batch generation over a prompt set with one loaded ``VideoGenerator``.

Every rank runs :func:`run_items` with the same arguments. Rank 0 resolves the set, repairs
the output tree and decides what to do (:func:`plan_on_main`); the plan is broadcast so all
ranks walk the same item list. For each item all ranks call ``generator.generate``; rank 0
then hashes the written mp4 and appends its manifest line. A failing item gets a ``failed``
line with the error text and the run goes on (it is retried by the next run), unless the
caption/VAE service failed for ``max_service_failures`` items in a row: then the run stops with
a summary instead of burning through every item.

One runner per output folder and shard: :class:`OutputLock` holds an exclusive ``flock`` on
``<root>/.lock-<manifest>`` (naming the holder's PID and host) for the whole run; a second
runner refuses with a message naming them.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..config import OutputConfig, SamplingConfig
from ..errors import UserError, is_service_error
from ..parallel.agree import on_main
from ..text_encoders.prompt_length import PromptLengthCounter
from ..vae.latents_file import latents_path, run_metadata, save_latents
from . import manifest
from .sets import EvalItem, load_items, select_items, sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """What this run does; identical on every rank."""

    todo: Tuple[EvalItem, ...]
    skipped: Tuple[str, ...]
    selected: int


@dataclass
class EvalSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: List[float] = field(default_factory=list)
    stopped: Optional[str] = None            # why the run stopped early, if it did

    @property
    def mean_seconds(self) -> float:
        return sum(self.seconds) / len(self.seconds) if self.seconds else 0.0

    def line(self) -> str:
        text = (f"evaluation: {self.done} done, {self.skipped} skipped, {self.failed} failed, "
                f"{self.mean_seconds:.1f} s per video")
        return text + (" (stopped early)" if self.stopped else "")


class OutputLock:
    """Exclusive lock of one output folder and shard, held by rank 0 for the whole run.

    ``acquire`` raises :class:`UserError` naming the holder (PID, host, start time) when another
    runner holds it. The lock is an ``flock`` on ``<root>/.lock-<manifest name>``, so it is
    released by the kernel when the holder dies, whatever the way.
    """

    def __init__(self, root, shard: Tuple[int, int] = (0, 1)):
        self.path = Path(root) / f".lock-{manifest.manifest_name(shard)}"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"another evaluation run is writing to {self.path.parent} ({holder}); wait for it to "
                            f"finish or stop it, or use another --save_path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)             # closing drops the flock


def plan_on_main(state, root, prompts: str, cache_dir, url: str, ids: Optional[Sequence[str]] = None,
                 shard: Tuple[int, int] = (0, 1), limit: Optional[int] = None,
                 motion_score: Optional[float] = None, categories: Optional[Sequence[str]] = None) -> EvalPlan:
    """Rank 0 loads the set, selects this run's items and repairs the tree; all ranks get the plan."""
    def plan() -> EvalPlan:
        items = load_items(prompts, cache_dir, url)
        if motion_score is not None:
            items = [item if item.motion_score is not None else replace(item, motion_score=motion_score)
                     for item in items]
        selected = select_items(items, ids=ids, shard=shard, limit=limit, categories=categories)
        todo, skipped = manifest.prepare(root, selected, shard=shard)
        return EvalPlan(todo=tuple(todo), skipped=tuple(skipped), selected=len(selected))

    return on_main(state, plan)


def model_info(model_dir) -> dict:
    """Model folder and, for a Hub snapshot (``.../snapshots/<rev>``), its revision."""
    path = Path(model_dir)
    revision = path.name if path.parent.name == "snapshots" else None
    return {"model_dir": str(model_dir), "model_revision": revision}


def item_sampling(item: EvalItem, sampling: SamplingConfig) -> SamplingConfig:
    return sampling.with_overrides(seed=item.seed, motion_score=item.motion_score)


def make_record(item: EvalItem, sampling: SamplingConfig, info: dict, status: str, path: Optional[str] = None,
                sha256: Optional[str] = None, timings: Optional[dict] = None, seconds: float = 0.0,
                error: Optional[str] = None) -> dict:
    return {"id": item.id, "index": item.index, "category": item.category, "prompt": item.prompt,
            "image": item.image, "seed": sampling.seed, "sampling": sampling.to_dict(), **info,
            "timings": dict(timings or {}), "timing": (timings or {}).get("summary"),   # the run's one-line summary
            "seconds": round(seconds, 3), "path": path, "sha256": sha256,
            "status": status, "error": error, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_items(generator, plan: EvalPlan, root, sampling: SamplingConfig, output: OutputConfig, state,
              shard: Tuple[int, int] = (0, 1), progress: bool = True, max_service_failures: int = 0,
              save_latents: bool = False) -> EvalSummary:
    """Generate every item of ``plan.todo``; rank 0 records the manifest and returns the summary.

    ``max_service_failures``: stop after this many consecutive items failed on the caption/VAE
    service (0: never). The decision is taken on every rank from the same shared failure.
    ``save_latents``: rank 0 also writes the final latents beside each video
    (``<NNN>-<slug>.latents.safetensors``, atomically, before the manifest line) and records
    their relative path as ``latents``.
    """
    root = Path(root)
    manifest_path = root / manifest.manifest_name(shard)
    summary = EvalSummary(skipped=len(plan.skipped))
    info = model_info(getattr(generator, "root", None) or generator.runtime.model_dir)
    lengths = PromptLengthCounter.from_model_dir(info["model_dir"]) if state.is_main else None
    bar = None
    if state.is_main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan.todo), desc="eval videos", unit="video", dynamic_ncols=True)
    service_streak = 0
    for position, item in enumerate(plan.todo):
        params = item_sampling(item, sampling)
        rel = manifest.relative_video_path(item)
        item_output = replace(output, save_path=str(root), output_path=str(root / rel))
        length = None if lengths is None else lengths.check(item.prompt, params.pos_magic, f"item {item.id}'s prompt")
        start = time.perf_counter()
        error, result, service_failure = None, None, False
        try:
            result = generator.generate(item.prompt, params, item_output, first_image=item.image, progress=False)
        except Exception as exc:          # recorded; the run goes on with the next item
            error = str(exc)
            service_failure = is_service_error(exc)
            if state.is_main:
                logger.error("item %s failed: %s", item.id, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        service_streak = service_streak + 1 if service_failure else 0
        seconds = time.perf_counter() - start
        if state.is_main:
            if error is None and (result is None or result.path is None or not Path(result.path).is_file()):
                error = "the pipeline returned no video file"
            if error is None:
                record = make_record(item, params, info, manifest.STATUS_OK, path=rel, sha256=sha256_file(root / rel),
                                     timings=result.timings, seconds=seconds)
                if save_latents:
                    record["latents"] = _save_item_latents(root, rel, result, item, params)
                summary.done += 1
                summary.seconds.append(seconds)
            else:
                record = make_record(item, params, info, manifest.STATUS_FAILED, seconds=seconds, error=error)
                summary.failed += 1
            if length is not None:
                record["prompt_tokens"] = length.to_dict()
            manifest.append_record(manifest_path, record)
            if bar is not None:
                bar.set_postfix(done=summary.done, failed=summary.failed)
                bar.update(1)
        if max_service_failures and service_streak >= max_service_failures:
            left = len(plan.todo) - position - 1
            summary.stopped = (f"stopped after {service_streak} consecutive items failed on the caption/VAE service "
                               f"(last: {error}); {left} item(s) not attempted; start or fix the service and rerun "
                               "the same command to resume")
            break
    if bar is not None:
        bar.close()
    state.barrier()
    return summary


def _save_item_latents(root: Path, rel: str, result, item: EvalItem, params: SamplingConfig) -> Optional[str]:
    """Write the item's final latents beside its video; their relative path, or None (logged) on failure."""

    latents = getattr(result, "latents", None)
    if latents is None:
        logger.warning("item %s: the pipeline returned no latents; none saved", item.id)
        return None
    target = latents_path(root / rel)
    try:
        save_latents(target, latents, run_metadata(item.prompt, params, id=item.id, video=Path(rel).name))
    except OSError as err:            # the video is done; a missing latents file must not fail the item
        logger.warning("item %s: latents not saved to %s: %s", item.id, target, err)
        return None
    return target.relative_to(root).as_posix()

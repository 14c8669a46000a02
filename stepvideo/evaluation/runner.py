"""Batch generation over a prompt set with one loaded ``VideoGenerator``.

Every rank runs :func:`run_items` with the same arguments. Rank 0 resolves the set, repairs
the output tree and decides what to do (:func:`plan_on_main`); the plan is broadcast so all
ranks walk the same item list. For each item all ranks call ``generator.generate``; rank 0
then hashes the written mp4 and appends its manifest line. A failing item gets a ``failed``
line with the error text and the run goes on (it is retried by the next run).
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..config import OutputConfig, SamplingConfig
from ..runtime import broadcast_from_main
from . import manifest as mf
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

    @property
    def mean_seconds(self) -> float:
        return sum(self.seconds) / len(self.seconds) if self.seconds else 0.0

    def line(self) -> str:
        return (f"evaluation: {self.done} done, {self.skipped} skipped, {self.failed} failed, "
                f"{self.mean_seconds:.1f} s per video")


def on_main(state, fn: Callable):
    """Run ``fn`` on rank 0 and broadcast its result (or its error) to every rank."""
    payload = None
    if state.is_main:
        try:
            payload = {"value": fn()}
        except Exception as exc:          # the other ranks must learn about it, or they hang
            payload = {"error": exc if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError))
                       else RuntimeError(f"{type(exc).__name__}: {exc}")}
    payload = broadcast_from_main(state, payload)
    if "error" in payload:
        raise payload["error"]
    return payload["value"]


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
        todo, skipped = mf.prepare(root, selected, shard=shard)
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
            "timings": dict(timings or {}), "seconds": round(seconds, 3), "path": path, "sha256": sha256,
            "status": status, "error": error, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_items(generator, plan: EvalPlan, root, sampling: SamplingConfig, output: OutputConfig, state,
              shard: Tuple[int, int] = (0, 1), progress: bool = True, save_latents: bool = False) -> EvalSummary:
    """Generate every item of ``plan.todo``; rank 0 records the manifest and returns the summary.

    ``save_latents``: rank 0 also writes the final latents beside each video
    (``<NNN>-<slug>.latents.safetensors``, atomically, before the manifest line) and records
    their relative path as ``latents``.
    """
    root = Path(root)
    manifest_path = root / mf.manifest_name(shard)
    summary = EvalSummary(skipped=len(plan.skipped))
    info = model_info(getattr(generator, "root", None) or generator.runtime.model_dir)
    bar = None
    if state.is_main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan.todo), desc="eval videos", unit="video", dynamic_ncols=True)
    for item in plan.todo:
        params = item_sampling(item, sampling)
        rel = mf.relative_video_path(item)
        item_output = replace(output, save_path=str(root), output_path=str(root / rel))
        start = time.perf_counter()
        error, result = None, None
        try:
            result = generator.generate(item.prompt, params, item_output, first_image=item.image, progress=False)
        except Exception as exc:          # recorded; the run goes on with the next item
            error = f"{type(exc).__name__}: {exc}"
            if state.is_main:
                logger.error("item %s failed: %s\n%s", item.id, error, traceback.format_exc())
        seconds = time.perf_counter() - start
        if state.is_main:
            if error is None and (result is None or result.path is None or not Path(result.path).is_file()):
                error = "the pipeline returned no video file"
            if error is None:
                record = make_record(item, params, info, mf.STATUS_OK, path=rel, sha256=sha256_file(root / rel),
                                     timings=result.timings, seconds=seconds)
                if save_latents:
                    record["latents"] = _save_item_latents(root, rel, result, item, params)
                summary.done += 1
                summary.seconds.append(seconds)
            else:
                record = make_record(item, params, info, mf.STATUS_FAILED, seconds=seconds, error=error)
                summary.failed += 1
            mf.append_record(manifest_path, record)
            if bar is not None:
                bar.set_postfix(done=summary.done, failed=summary.failed)
                bar.update(1)
    if bar is not None:
        bar.close()
    state.barrier()
    return summary


def _save_item_latents(root: Path, rel: str, result, item: EvalItem, params: SamplingConfig) -> Optional[str]:
    """Write the item's final latents beside its video; their relative path, or None (logged) on failure."""
    from ..vae.latents_file import latents_path_for, save_latents

    latents = getattr(result, "latents", None)
    if latents is None:
        logger.warning("item %s: the pipeline returned no latents; none saved", item.id)
        return None
    target = latents_path_for(root / rel)
    try:
        save_latents(target, latents, {"id": item.id, "prompt": item.prompt, "sampling": params.to_dict(),
                                       "video": Path(rel).name})
    except OSError as err:            # the video is done; a missing latents file must not fail the item
        logger.warning("item %s: latents not saved to %s: %s", item.id, target, err)
        return None
    return target.relative_to(root).as_posix()

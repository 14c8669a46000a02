"""The evaluation manifest: one JSON line per finished item, and the resume rules.

Layout under the output root (``--save_path``)::

    <root>/<category>/<NNN>-<slug>.mp4     one video per item (category folders slugified)
    <root>/manifest.jsonl                  one line per item (``manifest-shard<i>of<n>.jsonl`` per shard)

A line is appended (flush + fsync) only after its video was renamed into place, so a line
with ``status: ok`` always describes a complete file. Before a run, :func:`prepare` repairs
whatever a crash left behind, for the items of this run only (other shards may be writing
beside us): it drops unparsable (truncated) lines, lines of items about to be redone and
duplicates; deletes temporary ``.partial`` files and videos without a valid line; and
rewrites the manifest atomically. An item is skipped only when its line is ``ok`` and its
file exists with the recorded sha256; failed items are retried.

A folder made with another shard layout (an unsharded run, then ``--shard 0/2``) keeps its
valid videos: an item with a complete ``ok`` line in any other manifest of the folder is
adopted (skipped, its video untouched) instead of deleted and regenerated.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from ..io.atomic import atomic_write_bytes
from ..io.video import slugify
from .sets import EvalItem, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
STATUS_OK = "ok"
STATUS_FAILED = "failed"


def manifest_name(shard: Tuple[int, int]) -> str:
    i, n = shard
    return MANIFEST if n == 1 else f"manifest-shard{i}of{n}.jsonl"


def manifest_paths(root) -> List[Path]:
    """Every manifest under ``root`` (the unsharded one and the per-shard ones)."""
    root = Path(root)
    return sorted(p for p in root.glob("manifest*.jsonl") if p.is_file())


def category_dir(category: str) -> str:
    return "/".join(slugify(part, max_chars=60) for part in category.split("/") if part) or "default"


def relative_video_path(item: EvalItem) -> str:
    """``<category>/<NNN>-<slug>.mp4`` (posix, relative to the output root)."""
    return f"{category_dir(item.category)}/{item.index:03d}-{slugify(item.prompt, max_chars=40)}.mp4"


def read_records(path) -> List[dict]:
    """Complete, parsable lines of a manifest (a truncated last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break                                     # cut off by a crash mid-append
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                records.append(obj)
    return records


def read_all(root) -> List[dict]:
    return [r for p in manifest_paths(root) for r in read_records(p)]


def append_record(path, record: dict) -> None:
    """Append one line durably (flush + fsync)."""
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
    atomic_write_bytes(path, text.encode("utf-8"), suffix=".tmp")


def is_complete(root, record: dict) -> bool:
    """``ok`` line whose file exists with the recorded sha256."""
    if record.get("status") != STATUS_OK or not record.get("path") or not record.get("sha256"):
        return False
    video = Path(root) / record["path"]
    return video.is_file() and sha256_file(video) == record["sha256"]


def _remove_partials(video: Path) -> None:
    """Temporary files of ``write_mp4`` for this video (``.<stem>.<pid>.partial.mp4``)."""
    if video.parent.is_dir():
        for tmp in video.parent.glob(f".{video.stem}.*partial*"):
            logger.info("removing leftover temporary file %s", tmp)
            tmp.unlink(missing_ok=True)


def prepare(root, items: List[EvalItem], shard: Tuple[int, int] = (0, 1)) -> Tuple[List[EvalItem], List[str]]:
    """Repair the output tree for ``items`` and return ``(todo, skipped_ids)``.

    Runs on rank 0 only, before any generation.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / manifest_name(shard)
    records = read_records(path)
    ours = {item.id: item for item in items}
    kept: Dict[str, dict] = {}
    order: List[str] = []
    for record in records:                 # the last line of an id wins; ids of other runs are kept as they are
        rid = str(record["id"])
        if rid not in kept:
            order.append(rid)
        kept[rid] = record
    wanted = {item.id for item in items}
    elsewhere: Dict[str, dict] = {}            # complete lines of other manifests (another shard layout)
    for other in manifest_paths(root):
        if other.name != path.name:
            elsewhere.update((str(r["id"]), r) for r in read_records(other) if str(r["id"]) in wanted)
    todo, skipped = [], []
    for item in items:
        video = root / relative_video_path(item)
        _remove_partials(video)
        record = kept.get(item.id)
        if record is not None and record.get("path") == relative_video_path(item) and is_complete(root, record):
            skipped.append(item.id)
            continue
        adopted = elsewhere.get(item.id)
        if adopted is not None and adopted.get("path") == relative_video_path(item) and is_complete(root, adopted):
            logger.info("item %s: complete in another manifest of %s (other shard layout); kept", item.id, root)
            kept.pop(item.id, None)        # our own stale line of it, if any
            skipped.append(item.id)
            continue
        kept.pop(item.id, None)            # failed / stale / broken: redo it, with a fresh line
        if video.exists():
            logger.info("removing %s: no valid manifest line", video)
            video.unlink()
        todo.append(item)
    if records or path.exists():
        _rewrite(path, (kept[rid] for rid in order if rid in kept))
    unknown = [rid for rid in kept if rid not in ours]
    if unknown:
        logger.info("%d manifest line(s) belong to items outside this run; kept", len(unknown))
    return todo, skipped

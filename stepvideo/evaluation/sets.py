"""Prompt sets for batch evaluation: what to generate, one ``EvalItem`` per video.

Sources understood by :func:`load_items`:

* ``t2v-eval`` -- the 128 Chinese prompts of Step-Video-T2V-Eval (one per line), fetched
  once from the upstream raw URL into a cache folder and checked against its sha256. The
  file is not vendored; ``--prompts FILE`` with a local copy (same sha256) gives the same
  items and categories without any network.
* a directory -- the TI2V-Eval layout: ``NNN.png`` beside ``NNN.txt`` (the prompt), walked
  recursively; the folder relative to the root is the category (e.g. ``ti2v_eval_real/H``).
  An optional ``NNN.json`` sidecar may set ``seed`` and ``motion_score``.
* ``*.jsonl`` -- one object per line: ``prompt`` (required), ``seed``, ``category``, ``id``,
  ``image`` (relative to the file) and ``motion_score`` (all optional).
* any other text file -- one prompt per line, blank lines skipped, category ``default``.

Item indices are 1-based positions in the set; ids are ``NNN`` (or the JSONL ``id`` field,
or ``<category>/<stem>`` for TI2V trees) and stay stable when a run is filtered or sharded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..io.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

T2V_EVAL = "t2v-eval"
T2V_EVAL_URL = "https://raw.githubusercontent.com/stepfun-ai/Step-Video-T2V/main/benchmark/Step-Video-T2V-Eval"
T2V_EVAL_SHA256 = "02a404b88e14b55fb54770ef2e096dc11b102cef56d129dad2cfe90fcb5a965b"
T2V_EVAL_FILENAME = "Step-Video-T2V-Eval"
# (first line, last line, category), 1-based and inclusive, as published with the set
T2V_EVAL_CATEGORIES: Tuple[Tuple[int, int, str], ...] = (
    (1, 12, "Sports"), (13, 23, "Food"), (24, 35, "Scenery"), (36, 47, "Animals"),
    (48, 58, "Festivals"), (59, 70, "Combination Concepts"), (71, 81, "Surreal"), (82, 93, "People"),
    (94, 105, "3D Animation"), (106, 116, "Cinematography"), (117, 128, "Style"),
)
DEFAULT_CATEGORY = "default"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class EvalItem:
    """One video to generate."""

    index: int                               # 1-based position in the set
    id: str
    category: str
    prompt: str
    seed: Optional[int] = None
    image: Optional[str] = None              # TI2V first frame
    motion_score: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ t2v-eval
def t2v_eval_category(line_number: int) -> str:
    for first, last, name in T2V_EVAL_CATEGORIES:
        if first <= line_number <= last:
            return name
    raise ValueError(f"line {line_number} is outside the 128 lines of Step-Video-T2V-Eval")


def parse_t2v_eval(text: str) -> List[EvalItem]:
    """The 128 prompts with their categories (by line range)."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    expected = T2V_EVAL_CATEGORIES[-1][1]
    if len(lines) != expected or not all(lines):
        raise ValueError(f"Step-Video-T2V-Eval must have {expected} non-empty lines, got {len(lines)} "
                         f"({sum(1 for x in lines if not x)} empty)")
    return [EvalItem(index=i, id=f"{i:03d}", category=t2v_eval_category(i), prompt=p)
            for i, p in enumerate(lines, start=1)]


def fetch_t2v_eval(cache_dir, url: str = T2V_EVAL_URL, sha256: str = T2V_EVAL_SHA256,
                   timeout: float = 30.0) -> Path:
    """Path of the cached, verified Step-Video-T2V-Eval file; downloads it on first use.

    The download goes to a temporary file in ``cache_dir`` and is renamed into place only
    after its sha256 matched, so the cache never holds a partial or wrong file.
    """
    cache = Path(cache_dir).expanduser()
    target = cache / T2V_EVAL_FILENAME
    if target.is_file():
        if sha256_file(target) == sha256:
            return target
        logger.warning("cached %s has the wrong sha256; downloading it again", target)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"could not download the t2v-eval prompts from --prompts_url {url}: {err}. "
                           f"Offline? Pass a local copy with --prompts /path/to/{T2V_EVAL_FILENAME}") from err
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"the t2v-eval prompts downloaded from {url} have sha256 {got}, expected {sha256}; "
                         "the file was changed upstream or corrupted in transit (nothing was cached)")
    return atomic_write_bytes(target, data)


# ------------------------------------------------------------------------------ other sources
def parse_text_prompts(text: str) -> List[EvalItem]:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return [EvalItem(index=i, id=f"{i:03d}", category=DEFAULT_CATEGORY, prompt=p)
            for i, p in enumerate(prompts, start=1)]


def _optional(value, kind, name: str, where: str):
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}") from err


def load_jsonl(path) -> List[EvalItem]:
    path = Path(path)
    items, seen = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(obj, dict) or not str(obj.get("prompt", "")).strip():
            raise ValueError(f"{where}: each line must be an object with a non-empty 'prompt'")
        index = len(items) + 1
        item_id = str(obj.get("id") or f"{index:03d}")
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        image = obj.get("image")
        if image:
            image = str((path.parent / image).resolve()) if not os.path.isabs(image) else image
        items.append(EvalItem(index=index, id=item_id, category=str(obj.get("category") or DEFAULT_CATEGORY),
                              prompt=str(obj["prompt"]).strip(), seed=_optional(obj.get("seed"), int, "seed", where),
                              image=image or None,
                              motion_score=_optional(obj.get("motion_score"), float, "motion_score", where)))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def load_ti2v_dir(root, motion_score: Optional[float] = None) -> List[EvalItem]:
    """TI2V-Eval tree: every image with a ``.txt`` prompt beside it, sorted by relative path."""
    root = Path(root)
    images = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(root).as_posix())
    items = []
    for image in images:
        text = image.with_suffix(".txt")
        if not text.is_file():
            logger.warning("skipping %s: no prompt file %s beside it", image, text.name)
            continue
        rel = image.parent.relative_to(root).as_posix()
        category = rel if rel != "." else DEFAULT_CATEGORY
        extra = {}
        sidecar = image.with_suffix(".json")
        if sidecar.is_file():
            extra = json.loads(sidecar.read_text(encoding="utf-8"))
        where = str(sidecar)
        score = _optional(extra.get("motion_score"), float, "motion_score", where)
        items.append(EvalItem(index=len(items) + 1, id=f"{category}/{image.stem}", category=category,
                              prompt=text.read_text(encoding="utf-8").strip(), image=str(image.resolve()),
                              seed=_optional(extra.get("seed"), int, "seed", where),
                              motion_score=score if score is not None else motion_score))
    if not items:
        raise ValueError(f"--prompts {root}: no image with a prompt .txt beside it (expected NNN.png + NNN.txt)")
    return items


def load_items(spec: str, cache_dir, url: str = T2V_EVAL_URL) -> List[EvalItem]:
    """Items of ``spec``: ``t2v-eval``, a TI2V-Eval directory, a ``.jsonl`` or a text file."""
    if spec == T2V_EVAL:
        return parse_t2v_eval(fetch_t2v_eval(cache_dir, url).read_text(encoding="utf-8"))
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_ti2v_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {spec!r}: no such file or directory (or use the set name {T2V_EVAL!r})")
    if path.suffix.lower() == ".jsonl":
        return load_jsonl(path)
    if sha256_file(path) == T2V_EVAL_SHA256:         # a local copy of the official set keeps its categories
        return parse_t2v_eval(path.read_text(encoding="utf-8"))
    items = parse_text_prompts(path.read_text(encoding="utf-8"))
    if not items:
        raise ValueError(f"--prompts {path} holds no prompts")
    return items


# ------------------------------------------------------------------------------ selection
def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from err
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def shard_items(items: Sequence[EvalItem], shard: int, num_shards: int) -> List[EvalItem]:
    """Items whose 1-based index satisfies ``(index - 1) % num_shards == shard`` (round robin).

    Round robin spreads every category over all shards, so shards take similar time; the
    split depends only on the item indices, never on what was already generated.
    """
    return [item for item in items if (item.index - 1) % num_shards == shard]


def _category_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


def category_names(items: Sequence[EvalItem]) -> List[str]:
    """The categories of ``items`` in order of first appearance."""
    return list(dict.fromkeys(item.category for item in items))


def filter_categories(items: Sequence[EvalItem], categories: Sequence[str]) -> List[EvalItem]:
    """Items of the named categories (case, spaces, ``_`` and ``-`` do not matter:
    ``3d_animation`` selects ``3D Animation``); an unknown name is an error listing the known ones."""
    known = {_category_key(name): name for name in category_names(items)}
    wanted = set()
    for name in categories:
        key = _category_key(str(name))
        if key not in known:
            raise ValueError(f"--categories: unknown category {name!r}; this set has "
                             f"{', '.join(repr(n) for n in known.values())}")
        wanted.add(known[key])
    return [item for item in items if item.category in wanted]


def select_items(items: Sequence[EvalItem], ids: Optional[Sequence[str]] = None,
                 shard: Tuple[int, int] = (0, 1), limit: Optional[int] = None,
                 categories: Optional[Sequence[str]] = None) -> List[EvalItem]:
    """``--categories`` and ``--ids`` filters, then ``--shard``, then ``--limit`` (first N of this shard)."""
    selected = list(items)
    if categories:
        selected = filter_categories(selected, categories)
    if ids:
        wanted = {str(x) for x in ids}
        known = {item.id for item in items} | {str(item.index) for item in items}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"--ids: unknown id(s) {', '.join(unknown)}; ids look like {items[0].id!r}")
        selected = [item for item in selected if item.id in wanted or str(item.index) in wanted]
    selected = shard_items(selected, *shard)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"--limit must be >= 0, got {limit}")
        selected = selected[:limit]
    return selected

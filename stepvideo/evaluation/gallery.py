"""Static gallery of an evaluation run, rebuilt from the manifest(s) alone.

Writes, under the output root::

    index.html                      per category: prompt, parameters, <video>, thumbnail
    gallery/thumbs/<NNN>-<id>.png   first frame of each video
    gallery/contact_sheet.png       grid of all first frames

Every link is relative, so the folder can be copied or served as is. Prompts and errors are
HTML-escaped. Only the newest line of each item counts.
"""
from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

from ..io.video import read_mp4, slugify
from . import manifest
from .score_summary import METRICS, category_means

logger = logging.getLogger(__name__)

THUMB_DIR = "gallery/thumbs"
CONTACT_SHEET = "gallery/contact_sheet.png"
INDEX = "index.html"
_SHOWN_PARAMS = ("num_inference_steps", "guidance_scale", "time_shift", "num_frames", "height", "width",
                 "motion_score")

# Latin faces first, then the common CJK faces of Linux (Noto/Source Han, WenQuanYi), macOS
# (PingFang, Hiragino) and Windows (Microsoft YaHei/JhengHei); T2V-Eval prompts are Chinese
FONT_STACK = ('system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",'
              '"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Hiragino Sans GB","Microsoft YaHei",'
              '"Microsoft JhengHei","WenQuanYi Micro Hei","Noto Sans CJK JP","Noto Sans CJK KR",sans-serif')
CSS = "body{font-family:" + FONT_STACK + """;margin:1.5em;background:#fafafa}
.entry{display:flex;gap:1em;border:1px solid #ddd;background:#fff;padding:.7em;margin:.6em 0}
.entry.failed{border-color:#d33}.entry video{max-width:360px}.entry img{max-width:160px}
.prompt{font-size:1.05em;margin:.2em 0}.params{color:#555;font-size:.85em}.error{color:#d33}
.scores{color:#235;font-size:.85em}"""


def latest_records(root) -> List[dict]:
    """Newest line per id over all manifests, in item order."""
    latest: Dict[str, dict] = {}
    for record in manifest.read_all(root):
        latest[str(record["id"])] = record
    return sorted(latest.values(), key=lambda r: (r.get("index") or 0, str(r["id"])))


def _thumbnail(root: Path, record: dict, size: int = 256) -> Optional[str]:
    from PIL import Image

    video = root / record["path"]
    frames, _ = read_mp4(video)
    if len(frames) == 0:
        return None
    rel = f"{THUMB_DIR}/{record.get('index', 0):03d}-{slugify(str(record['id']), max_chars=40)}.png"
    image = Image.fromarray(frames[0])
    image.thumbnail((size, size))
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    image.save(root / rel)
    return rel


def _contact_sheet(root: Path, thumbs: List[str], cell: int = 128, columns: int = 8) -> Optional[str]:
    from PIL import Image

    if not thumbs:
        return None
    columns = min(columns, len(thumbs))
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for k, rel in enumerate(thumbs):
        with Image.open(root / rel) as im:
            im = im.convert("RGB")
            im.thumbnail((cell, cell))
            sheet.paste(im, ((k % columns) * cell + (cell - im.width) // 2, (k // columns) * cell + (cell - im.height) // 2))
    sheet.save(root / CONTACT_SHEET)
    return CONTACT_SHEET


REFERENCE_NOISE = "reference noise"


def seed_label(seed) -> str:
    """A seed as people read it: the number, or "reference noise" for ``None`` (the reference's
    fixed initial noise, the T2V-Eval default). Machine-readable records keep ``None``."""
    return REFERENCE_NOISE if seed is None else str(seed)


def _scores_text(scores) -> str:
    """``alignment 0.2712, temporal_consistency 0.9810, motion 3.41`` (whatever is present)."""

    if not isinstance(scores, dict):
        return ""
    shown = [f"{m} {scores[m]:.4f}" for m in METRICS if isinstance(scores.get(m), (int, float))]
    return ", ".join(shown)


def _entry(record: dict, thumb: Optional[str]) -> str:
    e = html.escape
    sampling = record.get("sampling") or {}
    params = ", ".join(f"{k}={sampling[k]}" for k in _SHOWN_PARAMS if k in sampling)
    params = f"seed: {seed_label(record.get('seed'))}, {params}"
    ok = record.get("status") == manifest.STATUS_OK and record.get("path")
    parts = [f'<div class="entry{"" if ok else " failed"}" id="item-{e(slugify(str(record["id"])))}" '
             f'data-id="{e(str(record["id"]))}">']
    if ok:
        poster = f' poster="{e(thumb)}"' if thumb else ""
        parts.append(f'<video src="{e(record["path"])}" controls loop muted preload="none"{poster}></video>')
        if thumb:
            parts.append(f'<a href="{e(record["path"])}"><img src="{e(thumb)}" alt="first frame"></a>')
    parts.append(f'<div><p class="prompt"><b>{e(str(record["id"]))}</b> {e(record.get("prompt", ""))}</p>')
    parts.append(f'<p class="params">{e(params)}</p>')
    scores = _scores_text(record.get("scores"))
    if scores:
        parts.append(f'<p class="scores">{e(scores)}</p>')
    if not ok:
        parts.append(f'<p class="error">failed: {e(str(record.get("error")))}</p>')
    parts.append("</div></div>")
    return "".join(parts)


def build_gallery(root, title: str = "Step-Video evaluation") -> Path:
    """Write ``index.html``, thumbnails and the contact sheet from the manifests under ``root``."""
    root = Path(root)
    records = latest_records(root)
    if not records:
        raise FileNotFoundError(f"no manifest lines under {root} (expected {manifest.MANIFEST}); "
                                "run the evaluation first")
    by_category: Dict[str, List[dict]] = {}
    thumbs: Dict[str, Optional[str]] = {}
    for record in records:
        by_category.setdefault(str(record.get("category", "default")), []).append(record)
        thumb = None
        if record.get("status") == manifest.STATUS_OK and record.get("path") and (root / record["path"]).is_file():
            try:
                thumb = _thumbnail(root, record)
            except Exception as exc:      # a broken video must not stop the gallery
                logger.warning("no thumbnail for %s: %s", record["path"], exc)
        thumbs[str(record["id"])] = thumb
    sheet = _contact_sheet(root, [t for t in thumbs.values() if t])
    e = html.escape
    ok = sum(1 for r in records if r.get("status") == manifest.STATUS_OK)
    body = [f"<h1>{e(title)}</h1>", f"<p>{ok} of {len(records)} items generated.</p>"]
    if sheet:
        body.append(f'<p><a href="{sheet}"><img src="{sheet}" alt="contact sheet" style="max-width:100%"></a></p>')
    model = next((r.get("model_dir") for r in records if r.get("model_dir")), None)
    if model:
        body.append(f"<p class=\"params\">model: {e(str(model))}</p>")

    means = category_means(records)
    if "overall" in means:
        body.append(f'<p class="scores">scores, all items: {e(_scores_text(means["overall"]))}</p>')
    for category in sorted(by_category):
        entries = by_category[category]
        body.append(f'<section class="category" data-category="{e(category)}"><h2>{e(category)} ({len(entries)})</h2>')
        if category in means:
            body.append(f'<p class="scores category-means">mean of {means[category]["items"]} scored: '
                        f'{e(_scores_text(means[category]))}</p>')
        body.extend(_entry(r, thumbs[str(r["id"])]) for r in entries)
        body.append("</section>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = root / INDEX
    tmp = index.with_name(f".{INDEX}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    (root / "gallery").mkdir(exist_ok=True)
    (root / "gallery" / "items.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return index

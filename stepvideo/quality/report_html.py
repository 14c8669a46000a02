"""The comparison page: the gallery's look, two videos side by side, heat maps of the worst items.

Written under the report folder::

    index.html                  summary per category, then one row per item (A | B | numbers)
    heatmaps/<NNN>-<id>.png     for the worst items: frames of A, of B, and |A - B| (hot colour map)

Video links are relative paths from the report folder to the two runs, so the three folders
can be moved together. Prompts and paths are HTML-escaped.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..evaluation.gallery import CSS, seed_label
from ..io.atomic import atomic_write_bytes
from ..io.video import read_mp4, slugify
from .compare import RunComparison, format_psnr, summarize

HEATMAP_DIR = "heatmaps"
INDEX = "index.html"
STRIP_FRAMES = 8
STRIP_HEIGHT = 96

_EXTRA_CSS = """.pair{display:flex;gap:.5em}.pair video{max-width:320px}
table.summary{border-collapse:collapse;margin:.5em 0}table.summary td,table.summary th{border:1px solid #ccc;padding:.2em .6em}
.heatmap img{max-width:100%}.identical{color:#080}.different{color:#b50}"""


def hot_colormap(values: np.ndarray) -> np.ndarray:
    """``float [..]`` in [0, 1] -> ``uint8 [.., 3]`` (black -> red -> yellow -> white)."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 3.0
    rgb = np.clip(np.concatenate([v, v - 1.0, v - 2.0], axis=-1), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def strip_frame_indices(num_frames: int, worst: int, count: int = STRIP_FRAMES) -> List[int]:
    """Up to ``count`` evenly spaced frame indices, always including ``worst``."""
    picked = {round(k * (num_frames - 1) / max(count - 1, 1)) for k in range(min(count, num_frames))}
    picked.add(worst)
    ordered = sorted(picked)
    while len(ordered) > count:          # drop the neighbour of the worst frame that crowds it
        ordered.remove(min((i for i in ordered if i != worst), key=lambda i: abs(i - worst)))
    return ordered


def heatmap_strip(frames_a: np.ndarray, frames_b: np.ndarray, worst: int, height: int = STRIP_HEIGHT):
    """A PIL image: row 1 frames of A, row 2 frames of B, row 3 ``|A - B|`` (scaled to its max)."""
    from PIL import Image

    idx = strip_frame_indices(len(frames_a), worst)
    a, b = frames_a[idx], frames_b[idx]                                  # [k, H, W, 3]
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)  # [k, H, W]
    scale = max(float(diff.max()), 1.0)
    heat = hot_colormap(diff / scale)
    h, w = a.shape[1:3]
    width = max(1, round(w * height / h))
    rows = []
    for block in (a, b, heat):
        tiles = [np.asarray(Image.fromarray(np.ascontiguousarray(t)).resize((width, height))) for t in block]
        rows.append(np.concatenate(tiles, axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0)), idx, scale


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _num(value, fmt="{:.4f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _summary_table(comparison: RunComparison) -> str:
    e = html.escape
    rows = ["<table class=\"summary\"><tr><th>category</th><th>items</th><th>identical</th><th>psnr min</th>"
            "<th>psnr mean</th><th>ssim mean</th><th>max |diff|</th><th>latents rel. L2 max</th></tr>"]
    for name, s in list(comparison.by_category().items()) + [("overall", summarize(comparison.items))]:
        rows.append(f"<tr data-category=\"{e(name)}\"><td>{e(name)}</td><td>{s['items']}</td><td>{s['identical']}</td>"
                    f"<td>{format_psnr(s['psnr_min'])}</td><td>{format_psnr(s['psnr_mean'])}</td>"
                    f"<td>{_num(s['ssim_mean'])}</td><td>{_num(s['max_abs_diff'], '{}')}</td>"
                    f"<td>{_num(s['latents_rel_l2_max'], '{:.3g}')}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _item_html(item: dict, out: Path, root_a: Path, root_b: Path, heatmap: Optional[str]) -> str:
    e = html.escape
    parts = [f'<div class="entry" id="item-{e(slugify(item["id"]))}" data-id="{e(item["id"])}">',
             '<div class="pair">']
    for label, root, key in (("A", root_a, "path_a"), ("B", root_b, "path_b")):
        src = e(_rel(root / item[key], out))
        parts.append(f'<figure><video src="{src}" controls loop muted preload="none"></video>'
                     f'<figcaption>{label}</figcaption></figure>')
    parts.append("</div><div>")
    parts.append(f'<p class="prompt"><b>{e(item["id"])}</b> {e(item.get("prompt", ""))}</p>')
    seed_a, seed_b = seed_label(item.get("seed_a")), seed_label(item.get("seed_b"))
    seeds = f"seed: {seed_a}" if seed_a == seed_b else f"seed: A {seed_a}, B {seed_b}"
    parts.append(f'<p class="params seed">{e(seeds)}</p>')
    if "error" in item:
        parts.append(f'<p class="error">not compared: {e(item["error"])}</p>')
    else:
        cls = "identical" if item["identical"] else "different"
        parts.append(f'<p class="params {cls}">identical: {"yes" if item["identical"] else "no"}, '
                     f'psnr {format_psnr(item["psnr"])} dB, ssim {item["ssim"]:.4f}, '
                     f'max |diff| {item["max_abs_diff"]}, mean |diff| {item["mean_abs_diff"]:.3f}, '
                     f'worst frame {item["worst_frame"]} ({format_psnr(item["worst_frame_psnr"])} dB)'
                     f'{", latents rel. L2 " + format(item["latents_rel_l2"], ".3g") if item.get("latents_rel_l2") is not None else ""}'
                     "</p>")
    if heatmap:
        parts.append(f'<p class="heatmap"><a href="{e(heatmap)}"><img src="{e(heatmap)}" '
                     'alt="frames of A, of B, and |A - B|"></a></p>')
    parts.append("</div></div>")
    return "".join(parts)


def build_compare_page(comparison: RunComparison, out_dir, worst: int = 8,
                       title: str = "Step-Video run comparison") -> Path:
    """Write ``index.html`` and the heat maps of the ``worst`` lowest-PSNR items under ``out_dir``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root_a, root_b = Path(comparison.run_a).resolve(), Path(comparison.run_b).resolve()
    heatmaps = {}
    for item in comparison.worst(worst):
        frames_a, _ = read_mp4(root_a / item["path_a"])
        frames_b, _ = read_mp4(root_b / item["path_b"])
        image, frames, scale = heatmap_strip(frames_a, frames_b, item["worst_frame"])
        rel = f"{HEATMAP_DIR}/{(item.get('index') or 0):03d}-{slugify(item['id'], max_chars=40)}.png"
        (out / HEATMAP_DIR).mkdir(exist_ok=True)
        image.save(out / rel)
        item["heatmap"] = {"path": rel, "frames": frames, "scale": scale}
        heatmaps[item["id"]] = rel
    e = html.escape
    body = [f"<h1>{e(title)}</h1>",
            f"<p class=\"params\">A: {e(str(comparison.run_a))}<br>B: {e(str(comparison.run_b))}</p>",
            "<p>B is measured against A. PSNR in dB over all frames (inf: identical); SSIM mean over frames; "
            "heat maps (worst items): frames of A, of B, then |A - B| scaled to its maximum.</p>",
            _summary_table(comparison)]
    if comparison.only_in_a or comparison.only_in_b:
        body.append(f"<p class=\"error\">not in both runs: A only {e(', '.join(comparison.only_in_a) or '-')}; "
                    f"B only {e(', '.join(comparison.only_in_b) or '-')}</p>")
    groups = {}
    for item in comparison.items:
        groups.setdefault(item["category"], []).append(item)
    for name in sorted(groups):
        s = summarize(groups[name])
        body.append(f'<section class="category" data-category="{e(name)}"><h2>{e(name)} ({len(groups[name])}): '
                    f'psnr mean {format_psnr(s["psnr_mean"])}, ssim mean {_num(s["ssim_mean"])}, '
                    f'{s["identical"]} identical</h2>')
        body.extend(_item_html(item, out, root_a, root_b, heatmaps.get(item["id"])) for item in groups[name])
        body.append("</section>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{CSS}\n{_EXTRA_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return atomic_write_bytes(out / INDEX, page.encode("utf-8"), suffix=".tmp")

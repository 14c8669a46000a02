"""Compare two evaluation runs item by item (matched by item id).

For every item that both runs finished: the pixel metrics of :func:`.metrics.compare_videos`
(B against A), and the relative L2 of the final latents when both runs saved them
(``--save_latents``). Items missing or failed in either run are listed, not compared. The
summary has one entry per category and one over all items.

``report.json`` is written with ``allow_nan``: the PSNR of identical videos is the JSON
token ``Infinity`` (Python's ``json`` reads it back as ``inf``).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..evaluation import manifest
from ..evaluation.gallery import latest_records
from ..io.atomic import atomic_write_bytes
from ..io.video import read_mp4
from ..vae.latents_file import load_latents
from .metrics import compare_videos, mean_finite, relative_l2

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"


def ok_records(root) -> Dict[str, dict]:
    """Newest ``ok`` manifest line per item id of the run under ``root``."""

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    if not manifest.manifest_paths(root):
        raise FileNotFoundError(f"{root} holds no {manifest.MANIFEST} (is it an evaluation output folder?)")
    return {str(r["id"]): r for r in latest_records(root) if r.get("status") == manifest.STATUS_OK and r.get("path")}


def _latents_l2(root_a: Path, rec_a: dict, root_b: Path, rec_b: dict) -> Optional[float]:
    if not rec_a.get("latents") or not rec_b.get("latents"):
        return None

    try:
        za, _ = load_latents(root_a / rec_a["latents"])
        zb, _ = load_latents(root_b / rec_b["latents"])
        return relative_l2(zb, za)
    except (OSError, ValueError) as err:
        logger.warning("latents of %s not compared: %s", rec_a["id"], err)
        return None


def compare_item(root_a: Path, rec_a: dict, root_b: Path, rec_b: dict, device=None) -> dict:
    """One item's comparison record (``psnr``, ``ssim``, ``identical``, ... or ``error``)."""

    item = {"id": str(rec_a["id"]), "index": rec_a.get("index"), "category": str(rec_a.get("category", "default")),
            "prompt": rec_a.get("prompt", ""), "path_a": rec_a["path"], "path_b": rec_b["path"],
            "seed_a": rec_a.get("seed"), "seed_b": rec_b.get("seed"),
            "scores_a": rec_a.get("scores"), "scores_b": rec_b.get("scores")}
    try:
        frames_a, _ = read_mp4(root_a / rec_a["path"])
        frames_b, _ = read_mp4(root_b / rec_b["path"])
        result = compare_videos(frames_a, frames_b, device=device)
    except (OSError, ValueError, RuntimeError) as err:
        item["error"] = f"{type(err).__name__}: {err}"
        return item
    item.update(result.to_dict())
    item["latents_rel_l2"] = _latents_l2(root_a, rec_a, root_b, rec_b)
    return item


def summarize(items: List[dict]) -> dict:
    """Counts and means of compared items (errors excluded)."""
    done = [i for i in items if "error" not in i]
    psnrs = [i["psnr"] for i in done]
    l2 = [i["latents_rel_l2"] for i in done if i.get("latents_rel_l2") is not None]
    return {
        "items": len(done),
        "errors": len(items) - len(done),
        "identical": sum(1 for i in done if i["identical"]),
        "psnr_min": min(psnrs) if psnrs else None,
        "psnr_mean": (math.inf if psnrs and all(math.isinf(p) for p in psnrs) else mean_finite(psnrs)),
        "ssim_mean": sum(i["ssim"] for i in done) / len(done) if done else None,
        "ssim_min": min((i["ssim"] for i in done), default=None),
        "max_abs_diff": max((i["max_abs_diff"] for i in done), default=None),
        "mean_abs_diff": sum(i["mean_abs_diff"] for i in done) / len(done) if done else None,
        "latents_rel_l2_max": max(l2) if l2 else None,
    }


@dataclass
class RunComparison:
    run_a: str
    run_b: str
    items: List[dict] = field(default_factory=list)
    only_in_a: List[str] = field(default_factory=list)
    only_in_b: List[str] = field(default_factory=list)

    def by_category(self) -> Dict[str, dict]:
        groups: Dict[str, List[dict]] = {}
        for item in self.items:
            groups.setdefault(item["category"], []).append(item)
        return {name: summarize(groups[name]) for name in sorted(groups)}

    def to_dict(self) -> dict:
        """``psnr_mean`` averages the finite PSNRs (inf only when every item is identical)."""
        return {"run_a": self.run_a, "run_b": self.run_b, "overall": summarize(self.items),
                "categories": self.by_category(), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "items": self.items}

    def worst(self, n: int) -> List[dict]:
        """The ``n`` compared, non-identical items with the lowest PSNR."""
        diff = [i for i in self.items if "error" not in i and not i["identical"]]
        return sorted(diff, key=lambda i: (i["psnr"], i["ssim"]))[:n]


def compare_runs(run_a, run_b, progress: bool = False, device=None) -> RunComparison:
    """Compare every item both runs finished; B is measured against A."""
    root_a, root_b = Path(run_a), Path(run_b)
    recs_a, recs_b = ok_records(root_a), ok_records(root_b)
    common = [rid for rid in recs_a if rid in recs_b]
    if not common:
        raise ValueError(f"the runs share no finished item: {root_a} has {sorted(recs_a)[:5]}..., "
                         f"{root_b} has {sorted(recs_b)[:5]}... (items are matched by id)")
    out = RunComparison(run_a=str(root_a), run_b=str(root_b),
                        only_in_a=sorted(set(recs_a) - set(recs_b)), only_in_b=sorted(set(recs_b) - set(recs_a)))
    from tqdm.auto import tqdm

    for rid in tqdm(common, desc="comparing", unit="video", disable=not progress):
        out.items.append(compare_item(root_a, recs_a[rid], root_b, recs_b[rid], device=device))
    return out


def write_report_json(comparison: RunComparison, out_dir) -> Path:
    """``<out_dir>/report.json`` (atomic; PSNR of identical videos = ``Infinity``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(comparison.to_dict(), ensure_ascii=False, indent=1, allow_nan=True)
    return atomic_write_bytes(out / REPORT_JSON, text.encode("utf-8"), suffix=".tmp")


def format_psnr(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def summary_lines(comparison: RunComparison) -> List[str]:
    """A plain-text table: one line per category, then the overall line."""
    rows = [("category", "items", "identical", "psnr_min", "psnr_mean", "ssim_mean", "max|diff|")]
    for name, s in list(comparison.by_category().items()) + [("overall", summarize(comparison.items))]:
        rows.append((name, str(s["items"]), str(s["identical"]), format_psnr(s["psnr_min"]),
                     format_psnr(s["psnr_mean"]), "-" if s["ssim_mean"] is None else f"{s['ssim_mean']:.4f}",
                     "-" if s["max_abs_diff"] is None else str(s["max_abs_diff"])))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]

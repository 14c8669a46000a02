"""Per-category means of the ``scores`` in manifest records (no torch: the gallery uses it)."""
from __future__ import annotations

from typing import Dict, List, Sequence

METRICS = ("alignment", "temporal_consistency", "motion")


def category_means(records: Sequence[dict]) -> Dict[str, Dict[str, float]]:
    """``{category: {metric: mean, "items": n}}`` plus ``"overall"``, over records with ``scores``."""
    groups: Dict[str, List[dict]] = {}
    for r in records:
        if isinstance(r.get("scores"), dict):
            groups.setdefault(str(r.get("category", "default")), []).append(r["scores"])
            groups.setdefault("overall", []).append(r["scores"])
    out = {}
    for name, rows in groups.items():
        means: Dict[str, float] = {"items": len(rows)}
        for metric in METRICS:
            values = [row[metric] for row in rows if isinstance(row.get(metric), (int, float))]
            if values:
                means[metric] = sum(values) / len(values)
        out[name] = means
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "overall", kv[0])))


def summary_lines(summary: dict) -> List[str]:
    rows = [("category", "items", *METRICS)]
    for name, means in summary["categories"].items():
        rows.append((name, str(means["items"]),
                     *("-" if m not in means else f"{means[m]:.4f}" for m in METRICS)))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]

"""Automatic scores of one run: text-video alignment, temporal consistency, motion.

* ``alignment``: mean over frames of the cosine similarity between the frame's Chinese-CLIP
  image embedding and the prompt's text embedding (transformers ``ChineseCLIPModel``; the
  prompts of Step-Video-T2V-Eval are Chinese). Raw cosine, not x100.
* ``temporal_consistency``: mean cosine similarity of consecutive frames' image embeddings.
* ``motion``: mean absolute difference of consecutive frames, in pixel values (0..255); no model.

Frames are preprocessed in torch (no torchvision): resized with bicubic antialiasing to the
processor's ``size`` (``height``/``width``, or ``shortest_edge`` then a centre crop), scaled to
[0, 1] and normalised with its ``image_mean`` / ``image_std`` (``preprocessor_config.json``).
This follows ``ChineseCLIPImageProcessor`` up to resampling differences (PIL vs torch).

Scores are written back into the run's manifest lines (``scores``: per metric, plus
``scorer``), each manifest rewritten atomically, and summarised per category in
``<run>/scores.json``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..accelerator import accelerator
from ..evaluation import manifest
from ..evaluation.gallery import latest_records
from ..io.atomic import atomic_write_bytes
from ..io.video import read_mp4
from ..loading.checkpoint import parse_dtype
from ..loading.hub import resolve_model_dir
from .compare import ok_records
from ..evaluation.score_summary import METRICS, category_means, summary_lines  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

MODEL_METRICS = ("alignment", "temporal_consistency")
DEFAULT_CLIP = "OFA-Sys/chinese-clip-vit-base-patch16"
CLIP_PATTERNS = ["*.json", "vocab.txt", "*.safetensors"]
SCORES_JSON = "scores.json"
_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def check_metrics(metrics: Sequence[str]) -> List[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


def motion_score(frames: torch.Tensor) -> float:
    """Mean ``|frame[t+1] - frame[t]|`` of ``uint8 [T, H, W, 3]`` (0 for a single frame)."""
    if frames.shape[0] < 2:
        return 0.0
    total = 0.0
    for t in range(frames.shape[0] - 1):        # one frame pair at a time: no video-sized float copy
        total += (frames[t + 1].float() - frames[t].float()).abs().mean().item()
    return total / (frames.shape[0] - 1)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize / crop / normalise settings of a CLIP image processor."""

    height: int
    width: int
    crop: bool                      # shortest-edge resize then centre crop (else: direct resize)
    mean: tuple = _DEFAULT_MEAN
    std: tuple = _DEFAULT_STD

    @classmethod
    def from_dir(cls, folder: Path, image_size: int) -> "ImagePreprocess":
        path = folder / "preprocessor_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        size = cfg.get("size") or {"height": image_size, "width": image_size}
        mean = tuple(cfg.get("image_mean") or _DEFAULT_MEAN)
        std = tuple(cfg.get("image_std") or _DEFAULT_STD)
        if "shortest_edge" in size:
            crop = cfg.get("crop_size") or {"height": image_size, "width": image_size}
            return cls(int(crop["height"]), int(crop["width"]), True, mean, std)
        return cls(int(size["height"]), int(size["width"]), False, mean, std)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [T, H, W, 3]`` -> normalised ``float32 [T, 3, h, w]``."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        if self.crop:
            scale = max(self.height, self.width) / min(x.shape[-2:])
            size = (max(self.height, round(x.shape[-2] * scale)), max(self.width, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            top, left = (x.shape[-2] - self.height) // 2, (x.shape[-1] - self.width) // 2
            x = x[..., top:top + self.height, left:left + self.width]
        else:
            x = F.interpolate(x, size=(self.height, self.width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


class ClipScorer:
    """Chinese-CLIP image and text embeddings (L2-normalised)."""

    def __init__(self, checkpoint: str = DEFAULT_CLIP, device: Optional[str] = None, dtype: str = "fp32",
                 batch_size: int = 32):
        from transformers import BertTokenizer, ChineseCLIPModel

        folder = resolve_model_dir(checkpoint, allow_patterns=CLIP_PATTERNS)
        if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
            # older Hub snapshots carry only pytorch_model.bin (loaded with weights_only by transformers)
            folder = resolve_model_dir(checkpoint, allow_patterns=CLIP_PATTERNS + ["pytorch_model.bin"])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--clip_model {checkpoint}: no config.json in {folder} (expected a "
                                    "transformers ChineseCLIPModel folder)")
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if accelerator().is_available() else "cpu"))
        self.dtype = parse_dtype(dtype)
        self.batch_size = batch_size
        self.model = ChineseCLIPModel.from_pretrained(str(folder), torch_dtype=self.dtype).to(self.device).eval()
        self.tokenizer = BertTokenizer.from_pretrained(str(folder))
        self.preprocess = ImagePreprocess.from_dir(folder, int(self.model.config.vision_config.image_size))
        limit = self.model.config.text_config.max_position_embeddings
        model_max = getattr(self.tokenizer, "model_max_length", limit) or limit
        self.max_length = int(min(limit, model_max if model_max < 100_000 else 52))

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """``[D]`` unit vector of ``text`` (truncated to the model's text length)."""
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return F.normalize(self.model.get_text_features(**tokens).float(), dim=-1)[0].cpu()

    @torch.no_grad()
    def image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [T, H, W, 3]`` -> ``[T, D]`` unit vectors, ``batch_size`` frames at a time."""
        out = []
        for start in range(0, frames.shape[0], self.batch_size):
            pixels = self.preprocess(frames[start:start + self.batch_size]).to(self.device, self.dtype)
            out.append(F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1).cpu())
        return torch.cat(out)


def score_frames(frames: torch.Tensor, prompt: str, metrics: Sequence[str],
                 scorer: Optional[ClipScorer] = None) -> Dict[str, float]:
    """The requested scores of one video ``uint8 [T, H, W, 3]``."""
    scores: Dict[str, float] = {}
    if "motion" in metrics:
        scores["motion"] = motion_score(frames)
    if any(m in MODEL_METRICS for m in metrics):
        if scorer is None:
            raise ValueError("alignment / temporal_consistency need a ClipScorer")
        images = scorer.image_embeddings(frames)                               # [T, D]
        if "alignment" in metrics:
            scores["alignment"] = float((images @ scorer.text_embedding(prompt)).mean())
        if "temporal_consistency" in metrics:
            scores["temporal_consistency"] = (float((images[1:] * images[:-1]).sum(-1).mean())
                                              if images.shape[0] > 1 else 1.0)
    return scores


# ------------------------------------------------------------------------------ a whole run
def store_scores(root, scored: Dict[tuple, dict]) -> int:
    """Add ``scores`` to every manifest line whose ``(id, sha256)`` was scored; each manifest is
    rewritten atomically. Returns the number of lines updated."""

    updated = 0
    for path in manifest.manifest_paths(root):
        records = manifest.read_records(path)
        changed = False
        for record in records:
            key = (str(record["id"]), record.get("sha256"))
            if key in scored:
                record["scores"] = scored[key]
                changed = True
                updated += 1
        if changed:
            text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
            atomic_write_bytes(path, text.encode("utf-8"), suffix=".tmp")
    return updated


def score_run(root, metrics: Sequence[str] = METRICS, checkpoint: str = DEFAULT_CLIP, device: Optional[str] = None,
              dtype: str = "fp32", ids: Optional[Sequence[str]] = None, progress: bool = False) -> dict:
    """Score every ``ok`` item of the run under ``root`` and store the scores; returns ``scores.json``'s dict."""
    from tqdm.auto import tqdm

    metrics = check_metrics(metrics)
    root = Path(root)
    records = ok_records(root)
    if ids:
        records = {rid: r for rid, r in records.items() if rid in {str(i) for i in ids}}
    if not records:
        raise ValueError(f"{root}: no finished item to score")
    missing = [r["path"] for r in records.values() if not (root / r["path"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} video(s) of ok items are missing, e.g. {missing[0]}")
    scorer = ClipScorer(checkpoint, device=device, dtype=dtype) if any(m in MODEL_METRICS for m in metrics) else None
    scorer_info = {"metrics": list(metrics), "model": checkpoint if scorer else None}
    scored: Dict[tuple, dict] = {}
    for record in tqdm(list(records.values()), desc="scoring", unit="video", disable=not progress):
        frames, _ = read_mp4(root / record["path"])
        values = score_frames(torch.from_numpy(frames), record.get("prompt", ""), metrics, scorer)
        previous = record.get("scores") if isinstance(record.get("scores"), dict) else {}
        merged = {**previous, **values, "scorer": scorer_info}
        scored[(str(record["id"]), record.get("sha256"))] = merged
        record["scores"] = merged
    store_scores(root, scored)

    summary = {"metrics": list(metrics), "model": scorer_info["model"],
               "categories": category_means(latest_records(root))}
    atomic_write_bytes(root / SCORES_JSON, json.dumps(summary, ensure_ascii=False, indent=1).encode("utf-8"),
                       suffix=".tmp")
    return summary

"""Caption assembly (``../shared/spec/STEP_VIDEO_SPEC.md`` §6.4): both text encoders behind one
``embedding(prompts)`` call.

``CaptionEncoder.embedding`` is the single seam between prompt text and the DiT: the local
encoder here and the remote caption client implement the same method with the same output::

    {"y":              (B, L, H_llm)    Step-LLM hidden states, LLM dtype (bf16), CPU
     "y_mask":         (B, 77 + L)      int64, 77 ones (CLIP tokens) ++ Step-LLM token mask, CPU
     "clip_embedding": (B, 77, H_clip)  HunyuanCLIP last_hidden_state cast to bf16, CPU}
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..loading import layout, resolve_model_dir
from .hunyuan_clip import HunyuanClip
from .step_llm import STEP1TextEncoder

logger = logging.getLogger(__name__)


def check_prompts(prompts) -> List[str]:
    """Return ``prompts`` as a list, or raise ValueError naming the problem."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single str; wrap it: [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings, got an empty list")
    bad = [f"{i}: {type(p).__name__}" for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings; non-strings at {', '.join(bad)}")
    return list(prompts)


class CaptionEncoder:
    """Step-LLM + HunyuanCLIP, returning what the DiT's caption path consumes.

    Args:
        text_encoder: a :class:`~stepvideo.text_encoders.step_llm.STEP1TextEncoder` (or any
            callable ``prompts -> (y [B, L, H], mask [B, L])``).
        clip: a :class:`~stepvideo.text_encoders.hunyuan_clip.HunyuanClip` (or any callable
            ``prompts -> (last_hidden_state [B, 77, C], _)``).
    """

    def __init__(self, text_encoder, clip):
        self.text_encoder = text_encoder
        self.clip = clip

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike], llm_dir: str = layout.LLM_DIR,
                        clip_dir: str = layout.CLIP_DIR, device: Union[str, torch.device] = "cpu",
                        llm_dtype: Optional[torch.dtype] = torch.bfloat16, max_length: int = 320,
                        clip_dtype: Optional[torch.dtype] = torch.float32, clip_max_length: int = 77,
                        progress: bool = False) -> "CaptionEncoder":
        """Load both encoders from a checkpoint folder (or Hub repo id, only the two sub-folders
        are downloaded). Step-LLM in ``llm_dtype`` (bf16), HunyuanCLIP in ``clip_dtype`` (fp32),
        both on ``device``."""
        root = resolve_model_dir(model_dir, allow_patterns=[f"{llm_dir}/*", f"{clip_dir}/*"])
        for sub in (llm_dir, clip_dir):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub} not found: the caption encoders need the "
                                        f"'{llm_dir}' and '{clip_dir}' folders of the checkpoint")
        # CLIP first: it is small, so a broken folder fails before the 40 GB LLM is read
        clip = HunyuanClip(root / clip_dir, clip_max_length, device=device, dtype=clip_dtype)
        text_encoder = STEP1TextEncoder(root / llm_dir, max_length, device=device, dtype=llm_dtype,
                                        progress=progress)
        return cls(text_encoder, clip)

    @torch.no_grad()
    def embedding(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Encode ``prompts`` (B strings, e.g. ``[prompt + pos_magic, neg_magic]``).

        Returns ``{"y": (B, L, H_llm), "y_mask": (B, 77 + L) int64, "clip_embedding":
        (B, 77, H_clip) bf16}``, all on CPU (see the module docstring).
        """
        prompts = check_prompts(prompts)
        y, y_mask = self.text_encoder(prompts)                                      # [B, L, H], [B, L]
        clip_embedding, _ = self.clip(prompts)                                      # [B, 77, C]
        clip_ones = torch.ones(y_mask.shape[0], clip_embedding.shape[1], dtype=torch.int64)
        y_mask = torch.cat([clip_ones, y_mask.to(device="cpu", dtype=torch.int64)], dim=1)  # [B, 77 + L]
        return {
            "y": y.cpu(),
            "y_mask": y_mask,
            "clip_embedding": clip_embedding.to(torch.bfloat16).cpu(),
        }

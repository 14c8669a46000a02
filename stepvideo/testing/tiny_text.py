"""Tiny ``step_llm/`` and ``hunyuan_clip/`` folders for the factory (filled in by the text encoders)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def write_tiny_step_llm(folder: Path, dims, seed: int = 2) -> None:
    """Placeholder until the Step-LLM component lands."""
    logger.warning("tiny factory: the step_llm part is not implemented yet; %s left empty", folder)
    Path(folder).mkdir(parents=True, exist_ok=True)


def write_tiny_hunyuan_clip(folder: Path, dims, seed: int = 3) -> None:
    """Placeholder until the HunyuanCLIP component lands."""
    logger.warning("tiny factory: the hunyuan_clip part is not implemented yet; %s left empty", folder)
    Path(folder).mkdir(parents=True, exist_ok=True)

"""Tiny ``vae/`` folder for the factory (filled in by the VAE component)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def write_tiny_vae(folder: Path, dims, seed: int = 1) -> None:
    """Write ``vae/vae_v2.safetensors`` for the tiny dims. Placeholder until the VAE lands."""
    logger.warning("tiny factory: the VAE part is not implemented yet; %s left empty", folder)
    Path(folder).mkdir(parents=True, exist_ok=True)

"""The models behind the service, and how the launcher loads them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..accelerator import accelerator
from ..loading import resolve_model_dir
from ..loading.checkpoint import parse_dtype
from ..models.vae import AutoencoderKL
from ..text_encoders.caption import CaptionEncoder
from .config import ServiceConfig
from .cost import VAECostModel
from .protocol import dtype_name

logger = logging.getLogger(__name__)


@dataclass
class ServiceComponents:
    """What :func:`stepvideo.caption_service.server.create_app` serves.

    Args:
        caption: object with ``embedding(prompts) -> {"y", "y_mask", "clip_embedding"}``
            (:class:`~stepvideo.text_encoders.caption.CaptionEncoder`), or None to not serve
            ``/caption-api``.
        vae: object with ``decode(z)``, ``encode(x, generator=, mode=)`` and the attributes
            ``z_channels``, ``in_channels``, ``dtype`` (:class:`~stepvideo.models.vae.AutoencoderKL`),
            or None to not serve ``/vae-api`` and ``/vae-encode-api``.
        caption_device, vae_device: where each runs; model calls on the same device are
            serialised.
        info: extra facts reported by ``/ready`` (dtypes, load times, model dir).
        vae_cost: the VAE's :class:`~stepvideo.caption_service.cost.VAECostModel`, warmed up by
            :func:`load_components`; None: the app builds one and warms it in the background.
    """

    caption: Optional[Any] = None
    vae: Optional[Any] = None
    caption_device: str = "cpu"
    vae_device: str = "cpu"
    info: Dict[str, Any] = field(default_factory=dict)
    vae_cost: Optional[Any] = None


def default_device() -> str:
    """The last visible GPU (the reference's choice, so the DiT workers keep the others), or CPU."""
    if accelerator().is_available() and accelerator().device_count() > 0:
        return f"cuda:{accelerator().device_count() - 1}"
    return "cpu"


def normalize_device(device: str) -> str:
    """``"cuda"`` -> ``"cuda:<current>"``, ``"cuda:1"`` checked against the visible GPUs."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not accelerator().is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        index = accelerator().current_device() if dev.index is None else dev.index
        if index >= accelerator().device_count():
            raise ValueError(f"device {device!r} does not exist: {accelerator().device_count()} GPU(s) visible")
        return f"cuda:{index}"
    return str(dev)


def load_components(config: ServiceConfig, progress: bool = False) -> ServiceComponents:
    """Load the VAE and the caption encoders named by ``config`` (VAE first, like the reference)."""
    if config.model_dir is None:
        raise ValueError("model_dir is required to load the service models")
    patterns = []
    if config.load_vae:
        patterns += [f"{config.vae_dir}/*"]
    if config.load_caption:
        patterns += [f"{config.llm_dir}/*", f"{config.clip_dir}/*"]
    root = resolve_model_dir(config.model_dir, allow_patterns=patterns)
    dtype = parse_dtype(config.dtype)
    out = ServiceComponents(info={"model_dir": str(root)})

    if config.load_vae:
        vae_path = root / config.vae_dir
        if not vae_path.is_dir():
            raise FileNotFoundError(f"VAE folder {vae_path} not found (--vae_dir {config.vae_dir!r})")
        device = normalize_device(config.vae_device)
        start = time.perf_counter()
        out.vae = AutoencoderKL.from_pretrained(vae_path, dtype=dtype, device=device)
        out.vae_device = device
        out.info["vae"] = {"dtype": dtype_name(dtype), "load_seconds": round(time.perf_counter() - start, 2)}
        logger.info("VAE loaded on %s (%s) in %.1f s", device, dtype_name(dtype), out.info["vae"]["load_seconds"])
        # the cost model's first use builds a fake copy of the VAE (seconds of pure Python that
        # would slow /health down if it ran while serving): do it now, before /ready says 200

        start = time.perf_counter()
        out.vae_cost = VAECostModel(out.vae)
        out.vae_cost.warm_up()
        out.info["vae"]["cost_model_seconds"] = round(time.perf_counter() - start, 2)

    if config.load_caption:
        device = normalize_device(config.caption_device)
        start = time.perf_counter()
        out.caption = CaptionEncoder.from_pretrained(root, llm_dir=config.llm_dir, clip_dir=config.clip_dir,
                                                     device=device, llm_dtype=dtype, progress=progress)
        out.caption_device = device
        out.info["caption"] = {"llm_dtype": dtype_name(dtype), "clip_dtype": "float32",
                               "load_seconds": round(time.perf_counter() - start, 2)}
        logger.info("caption encoders loaded on %s in %.1f s", device, out.info["caption"]["load_seconds"])
    return out

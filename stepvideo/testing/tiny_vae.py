"""Tiny ``vae/`` folder for the factory: ``vae_v2.safetensors`` (official key names) + ``config.json``.

The official folder holds only ``vae_v2.safetensors`` (its architecture is the constructor
default); the tiny folder adds ``config.json`` with the constructor kwargs, which
``AutoencoderKL.from_pretrained`` reads when present.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..loading import layout, save_sharded
from ..models.vae import AutoencoderKL, iter_checkpoint_items
from .init import init_random_weights

logger = logging.getLogger(__name__)


def tiny_vae_config(dims) -> dict:
    """``AutoencoderKL`` constructor kwargs for the tiny dims (``stepvideo.testing.tiny.TinyDims``)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "z_channels": dims.z_channels,
        "num_res_blocks": dims.vae_num_res_blocks,
        "version": 2,
        "encoder_ch": dims.vae_encoder_ch,
        "encoder_ch_mult": list(dims.vae_encoder_ch_mult),
        "decoder_ch": dims.vae_decoder_ch,
        "decoder_ch_mult": list(dims.vae_decoder_ch_mult),
    }


def write_tiny_vae(folder: Path, dims, seed: int = 1) -> Path:
    """Write a random tiny Video-VAE v2 to ``folder`` and return the weights file.

    Weights follow :func:`stepvideo.testing.init.init_random_weights` (float32) and are saved
    under the checkpoint key names, i.e. ``decoder.conv_out.{weight,bias}`` as in the official
    file.
    """
    folder = Path(folder)
    config = tiny_vae_config(dims)
    model = AutoencoderKL(**config)
    init_random_weights(model, seed=seed)
    state = {key: value.to(torch.float32) for key, value in iter_checkpoint_items(model)}
    weights_name = layout.VAE_V2_FILE[: -len(".safetensors")]
    [path] = save_sharded(state, folder, weights_name, num_shards=1)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}, indent=2))
    logger.debug("tiny VAE written to %s", path)
    return path

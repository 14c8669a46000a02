"""Tiny-model factory: write a complete model directory in the official layout.

    python -m stepvideo.testing.tiny OUT_DIR [--variant t2v|ti2v] [--seed 0]

The folder it writes loads through exactly the same code as the official checkpoints
(``StepVideoModel.from_pretrained``, the VAE and text-encoder loaders, the service), so the
tests, the demo and the benchmarks exercise the real loading path on CPU.

Tiny dimensions, chosen once so that the parts fit together
-----------------------------------------------------------

=====================  =========  ===========================================================
quantity               tiny       constraint
=====================  =========  ===========================================================
DiT heads x head dim   4 x 128    heads divisible by 4 (4-rank SP/TP tests); head dim 128 for
                                  the [64, 32, 32] 3D-RoPE split
DiT layers             2
latent channels        8          DiT in/out channels = VAE ``z_channels``
LLM hidden / heads     128 / 4    ``caption_channels[0]`` = LLM hidden; 2 kv groups
LLM layers / FFN       2 / 256
LLM vocab              512        sentencepiece model trained locally (same size)
CLIP hidden            64         ``caption_channels[1]`` = BERT hidden; 2 layers, 2 heads
CLIP positions         80         >= 77 tokens of the caption path
VAE enc / dec width    32 / 32    decoder width a multiple of 4 x ``z_channels`` (v2 shortcuts)
=====================  =========  ===========================================================

A 2-step generation of 17 frames at 64x64 (latent 3 x 4 x 4) takes seconds on CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..config import DiTConfig
from ..loading import layout, save_sharded
from ..models.dit import StepVideoModel
from .init import init_random_weights
from .tiny_text import write_tiny_hunyuan_clip, write_tiny_step_llm
from .tiny_vae import write_tiny_vae

logger = logging.getLogger(__name__)

VARIANTS = ("t2v", "ti2v")
PARTS = ("transformer", "scheduler", "vae", "step_llm", "hunyuan_clip")


@dataclass(frozen=True)
class TinyDims:
    """The one table of tiny sizes (see the module docstring for the constraints)."""

    dit_heads: int = 4
    dit_head_dim: int = 128
    dit_layers: int = 2
    z_channels: int = 8
    llm_hidden: int = 128
    llm_heads: int = 4
    llm_groups: int = 2
    llm_layers: int = 2
    llm_ffn: int = 256
    llm_vocab: int = 512
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    clip_intermediate: int = 128
    clip_max_positions: int = 80
    vae_encoder_ch: int = 32
    vae_encoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 1)
    vae_decoder_ch: int = 32
    vae_decoder_ch_mult: Tuple[int, ...] = (1, 1, 1, 1)
    vae_num_res_blocks: int = 2

    def __post_init__(self):
        if self.dit_heads % 4:
            raise ValueError(f"dit_heads must be divisible by 4 for 4-rank tests, got {self.dit_heads}")
        if self.dit_head_dim != 128:
            raise ValueError(f"dit_head_dim must be 128 (3D RoPE split [64, 32, 32]), got {self.dit_head_dim}")
        if self.vae_decoder_ch % (4 * self.z_channels) and (4 * self.z_channels) % self.vae_decoder_ch:
            raise ValueError("VAE decoder width must be a multiple of 4 x z_channels "
                             f"(got {self.vae_decoder_ch} and z {self.z_channels})")

    def dit_config(self, variant: str) -> DiTConfig:
        """The tiny DiT of ``variant`` (``t2v`` or ``ti2v``), with the diffusers bookkeeping keys
        an official ``config.json`` carries (kept in ``extra`` on purpose: loaders must ignore them)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        return DiTConfig(
            num_attention_heads=self.dit_heads, attention_head_dim=self.dit_head_dim,
            in_channels=self.z_channels, out_channels=self.z_channels, num_layers=self.dit_layers,
            use_additional_conditions=variant == "ti2v", caption_channels=(self.llm_hidden, self.clip_hidden),
            attention_type="parallel", extra={"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"})

    def transformer_config(self, variant: str) -> dict:
        """``transformer/config.json`` contents (:meth:`dit_config` as a dict)."""
        return self.dit_config(variant).to_dict()


TINY = TinyDims()
TINY_DIT = {variant: TINY.dit_config(variant) for variant in VARIANTS}   # the tiny DiTs as DiTConfig


def _write_transformer(folder: Path, dims: TinyDims, variant: str, seed: int, num_shards: int) -> None:
    import torch

    config = dims.dit_config(variant)
    model = StepVideoModel.from_config(config)
    init_random_weights(model, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json(folder / layout.TRANSFORMER_CONFIG)
    save_sharded({k: v.to(torch.float32) for k, v in model.state_dict().items()}, folder,
                 layout.TRANSFORMER_WEIGHTS, num_shards=num_shards)


def _write_scheduler(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "FlowMatchDiscreteScheduler", "_diffusers_version": "0.31.0",
              "num_train_timesteps": 1000, "reverse": False, "solver": "euler"}
    (folder / layout.SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2))


def _write_part(part: str, root: Path, dims: TinyDims, variant: str, seed: int, dit_shards: int) -> None:
    if part == "transformer":
        _write_transformer(root / layout.TRANSFORMER_DIR, dims, variant, seed, dit_shards)
    elif part == "scheduler":
        _write_scheduler(root / layout.SCHEDULER_DIR)
    elif part == "vae":
        write_tiny_vae(root / layout.VAE_DIR, dims, seed=seed + 1)
    elif part == "step_llm":
        write_tiny_step_llm(root / layout.LLM_DIR, dims, seed=seed + 2)
    elif part == "hunyuan_clip":
        write_tiny_hunyuan_clip(root / layout.CLIP_DIR, dims, seed=seed + 3)
    else:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def write_tiny_model_dir(out_dir, variant: str = "t2v", seed: int = 0, dims: TinyDims = TINY,
                         parts: Optional[Sequence[str]] = None, dit_shards: int = 2,
                         overwrite: bool = False) -> Path:
    """Write a complete tiny model directory to ``out_dir`` and return its path.

    The folder is assembled in a temporary sibling and renamed into place, so an interrupted
    run never leaves a half-written model dir behind.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    parts = tuple(parts or PARTS)
    out = Path(out_dir)
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for part in parts:
            _write_part(part, tmp, dims, variant, seed, dit_shards)
        index = {"_class_name": "StepVideoPipeline", "_diffusers_version": "0.31.0",
                 "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
                 "transformer": ["stepvideo", "StepVideoModel"]}
        (tmp / layout.MODEL_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "tiny_model.json").write_text(json.dumps(
            {"variant": variant, "seed": seed, "parts": list(parts), "dims": asdict(dims)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo.testing.tiny",
                                     description="Write a tiny random Step-Video model dir (official layout).")
    parser.add_argument("out_dir", help="folder to create")
    parser.add_argument("--variant", choices=VARIANTS, default="t2v")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="subset of parts to write")
    parser.add_argument("--dit_shards", type=int, default=2, help="number of transformer shards")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = write_tiny_model_dir(args.out_dir, variant=args.variant, seed=args.seed, parts=args.parts,
                                    dit_shards=args.dit_shards, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model folder in the official layout whose weight files hold shapes, not values.

``write_model_dir(out, variant, full=True)`` writes the released architecture (48-block 30B DiT,
48-layer Step-LLM, BERT-large HunyuanCLIP, the Video-VAE) as safetensors files whose header is
complete and whose data region is a sparse hole: the folder takes a few MiB on disk, passes every
pre-flight check of the loaders, and under ``FakeTensorMode`` the loaders read shape-only
tensors from it (:func:`stepvideo.loading.checkpoint.iter_safetensors`). ``full=False`` keeps the
tiny model of :mod:`stepvideo.testing.tiny` (CI rehearsals). Tokenizers are the tiny factory's
(their ids index the real-size embedding tables all the same).
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Dict

import torch

from ..config import DiTConfig
from ..loading import layout
from ..loading.checkpoint import SAFETENSORS_DTYPES
from ..models.dit import StepVideoModel
from ..models.vae import AutoencoderKL, iter_checkpoint_items
from ..perf.memory_accounting import CLIP_BERT_CONFIG
from ..testing.tiny import write_tiny_model_dir
from ..testing.tiny_text import step_llm_config
from ..text_encoders.step_llm import Step1Config, Step1Model

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_shape_only_safetensors(shapes: Dict[str, torch.Tensor], path: Path,
                                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Write the header of ``shapes`` (name -> tensor whose shape counts; floating tensors stored
    as ``dtype``) and a sparse data region of the right size; returns the data bytes."""
    header, offset = {}, 0
    for key, t in shapes.items():
        stored = dtype if t.is_floating_point() else t.dtype
        size = t.numel() * torch.empty((), dtype=stored).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[stored], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "stepvideo": "shape-only (rehearsal)"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)          # a hole: no disk blocks
    return offset


def _replace_weights(folder: Path, stem: str, shapes: Dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for old in list(folder.glob(f"{stem}*.safetensors")) + list(folder.glob(f"{stem}*.safetensors.index.json")):
        old.unlink()
    write_shape_only_safetensors(shapes, folder / f"{stem}.safetensors", dtype)


def _full_transformer(root: Path, variant: str) -> None:

    folder = root / layout.TRANSFORMER_DIR
    config = DiTConfig(use_additional_conditions=variant == "ti2v",
                       extra={"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"})
    config.to_json(folder / layout.TRANSFORMER_CONFIG)
    with torch.device("meta"):
        model = StepVideoModel.from_config(config)
    _replace_weights(folder, layout.TRANSFORMER_WEIGHTS, model.state_dict(), torch.bfloat16)


def _full_step_llm(root: Path) -> None:
    from types import SimpleNamespace

    real = Step1Config()
    dims = SimpleNamespace(llm_hidden=real.hidden_size, llm_layers=real.num_layers, llm_heads=real.num_attention_heads,
                           llm_groups=real.num_attention_groups, llm_ffn=real.ffn_hidden_size,
                           llm_vocab=real.padded_vocab_size)
    folder = root / layout.LLM_DIR
    config = step_llm_config(dims)
    (folder / layout.LLM_CONFIG).write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        model = Step1Model(config, dtype=torch.bfloat16)
    _replace_weights(folder, layout.LLM_WEIGHTS, model.state_dict(), torch.bfloat16)


def _full_clip(root: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = root / layout.CLIP_DIR / layout.CLIP_ENCODER_SUBDIR
    config = BertConfig(**CLIP_BERT_CONFIG, hidden_act="gelu", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0)
    config.architectures = ["BertModel"]
    config.to_json_file(str(folder / "config.json"))
    with torch.device("meta"):
        model = BertModel(config)
    _replace_weights(folder, "model", model.state_dict(), torch.float32)


def _full_vae(root: Path) -> None:

    folder = root / layout.VAE_DIR
    (folder / "config.json").unlink(missing_ok=True)      # the official folder has none: defaults
    with torch.device("meta"):
        model = AutoencoderKL()
    stem = layout.VAE_V2_FILE[: -len(".safetensors")]
    _replace_weights(folder, stem, dict(iter_checkpoint_items(model)), torch.float32)


def model_dir_for(work: Path, mode: str, full: bool) -> Path:
    """The shape-only model folder of ``mode`` ("t2v" / "ti2v") in ``work``, written on first use."""
    variant = "ti2v" if mode == "ti2v" else "t2v"
    folder = work / f"model-{variant}-{'full' if full else 'tiny'}"
    if not (folder / "model_index.json").is_file():
        write_model_dir(folder, variant, full=full)
    return folder


def write_model_dir(out, variant: str = "t2v", full: bool = True) -> Path:
    """The folder described in the module docstring; replaces ``out`` if it exists."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    write_tiny_model_dir(out, variant=variant)
    if full:
        (out / "tiny_model.json").unlink()
        _full_transformer(out, variant)
        _full_step_llm(out)
        _full_clip(out)
        _full_vae(out)
    return out

"""HunyuanCLIP text encoder (``../shared/spec/STEP_VIDEO_SPEC.md`` §6.3): a transformers ``BertModel`` +
``BertTokenizer``.

Folder layout (``<model_dir>`` = the checkpoint's ``hunyuan_clip``)::

    clip_text_encoder/config.json
    clip_text_encoder/model.safetensors | pytorch_model.bin
    tokenizer/vocab.txt, tokenizer_config.json, special_tokens_map.json

The model is built on ``meta`` and the weights are streamed to the target device/dtype.
``pytorch_model.bin`` (what the official checkpoint ships) is read with
``torch.load(weights_only=True)``, never with full unpickling.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..loading import (CorruptCheckpointError, assert_materialized, check_safetensors_file, find_weight_files,
                       iter_safetensors, layout, load_state_into_model)
from ..loading.checkpoint import LFS_POINTER_PREFIX

logger = logging.getLogger(__name__)

BIN_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_WEIGHTS = "model"  # model.safetensors (or model-0000k-of-0000n + index)


def _weight_source(encoder_dir: Path) -> Tuple[str, list]:
    """``("safetensors", files)`` when safetensors weights exist, else ``("bin", [pytorch_model.bin])``."""

    try:
        return "safetensors", find_weight_files(encoder_dir, SAFETENSORS_WEIGHTS)
    except FileNotFoundError:
        pass
    bin_file = encoder_dir / BIN_WEIGHTS
    if bin_file.is_file():
        return "bin", [bin_file]
    raise FileNotFoundError(f"no HunyuanCLIP weights in {encoder_dir}: expected model.safetensors "
                            f"(or shards + index) or {BIN_WEIGHTS}")


def _read_bin(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of a state dict (memory-mapped, so tensors are paged in
    one at a time as they are moved to the target device)."""
    import zipfile

    with open(path, "rb") as fh:
        if fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
            raise CorruptCheckpointError(
                f"{path} is a git-lfs pointer file, not the weights: run `git lfs pull` in the checkpoint "
                "repository or download it with huggingface_hub")
    # mmap needs the zip format (torch >= 1.6); older pickles are read into memory
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle/zip errors come in many types
        raise CorruptCheckpointError(f"{path} could not be read as a torch weights file with "
                                     f"weights_only=True ({type(err).__name__}: {err}); if it was truncated, "
                                     "download it again") from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _module_key(key: str) -> Optional[str]:
    """Map a stored key to the ``BertModel`` key; ``None`` drops it (old persistent buffers)."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.endswith("position_ids") or key.endswith("token_type_ids"):
        return None
    return key


def load_bert(encoder_dir: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
              dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Build ``BertModel`` from ``<encoder_dir>/config.json`` on ``meta`` and stream its weights
    to ``device``/``dtype`` (``None`` keeps the stored dtype)."""
    from safetensors import safe_open
    from transformers import BertConfig, BertModel

    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"HunyuanCLIP config not found: {encoder_dir / 'config.json'}")
    config = BertConfig.from_pretrained(str(encoder_dir))
    kind, files = _weight_source(encoder_dir)
    if kind == "safetensors":
        keys = []
        for f in files:
            check_safetensors_file(f)
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                keys.extend(fh.keys())

        def stored():
            for f in files:
                yield from iter_safetensors(f)
    else:
        state = _read_bin(files[0])
        keys = list(state)

        def stored():
            for key in keys:
                yield key, state.pop(key)

    # the pooler output is discarded; build the pooler only when the checkpoint has it
    with_pooler = any((_module_key(k) or "").startswith("pooler.") for k in keys)
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=with_pooler)

    def renamed():
        for key, value in stored():
            name = _module_key(key)
            if name is not None:
                yield name, value

    load_state_into_model(model, renamed(), dtype=dtype, device=device, strict=True, where=str(encoder_dir))
    # non-persistent buffers are never in checkpoints: rebuild them on the target device
    emb = model.embeddings
    positions = config.max_position_embeddings
    emb.register_buffer("position_ids", torch.arange(positions, device=device).expand((1, -1)), persistent=False)
    if getattr(emb, "token_type_ids", None) is not None:
        emb.register_buffer("token_type_ids", torch.zeros((1, positions), dtype=torch.long, device=device),
                            persistent=False)
    assert_materialized(model, f"HunyuanCLIP ({encoder_dir})")
    return model.eval().requires_grad_(False)


class HunyuanClip(nn.Module):
    """BERT text encoder of the caption path (reference name and positional args).

    Args:
        model_dir: the ``hunyuan_clip`` folder.
        max_length: tokens per prompt (77).
        device, dtype: fp32 by default, as upstream runs it.
    """

    def __init__(self, model_dir: Union[str, os.PathLike], max_length: int = 77, *,
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        from transformers import BertTokenizer

        model_dir = Path(model_dir)
        tokenizer_dir = model_dir / layout.CLIP_TOKENIZER_SUBDIR
        if not (tokenizer_dir / "vocab.txt").is_file():
            raise FileNotFoundError(f"HunyuanCLIP tokenizer not found: {tokenizer_dir / 'vocab.txt'}")
        self.max_length = int(max_length)
        self.tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
        self.text_encoder = load_bert(model_dir / layout.CLIP_ENCODER_SUBDIR, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.embeddings.word_embeddings.weight.device

    @torch.no_grad()
    def forward(self, prompts: Union[str, Sequence[str]], with_mask: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``prompts`` (B strings) → ``(last_hidden_state [B, max_length, C], pooler_output [B, C])``;
        ``pooler_output`` is ``None`` for a checkpoint without pooler weights."""
        tokens = self.tokenizer(list(prompts) if not isinstance(prompts, str) else [prompts],
                                padding="max_length", max_length=self.max_length, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        out = self.text_encoder(tokens["input_ids"].to(self.device),
                                attention_mask=tokens["attention_mask"].to(self.device) if with_mask else None)
        return out.last_hidden_state, out.pooler_output

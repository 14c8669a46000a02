"""Step-LLM text encoder (``../shared/spec/STEP_VIDEO_SPEC.md`` §6.2): ``Step1Model`` and the
``STEP1TextEncoder`` facade.

A LLaMA-style decoder used as an encoder: token embedding, ``num_layers`` pre-norm blocks
(RMSNorm → GQA attention with the causal sqrt-ALiBi bias → residual; RMSNorm → SwiGLU FFN →
residual), **no** final norm, no positional table and no LM head. The output is the residual
stream after the last block.

Layout letters: B batch, L tokens, H hidden width, N query heads, G key/value groups,
D head dim (H / N).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import find_weight_files, layout, load_files_into_model, read_json, resolve_model_dir
from ..models.norms import RMSNorm
from .alibi import sqrt_alibi_attention, sqrt_alibi_bias
from .tokenizer import Wrapped_StepChatTokenizer

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step1Config:
    """The ``step_llm/config.json`` fields the encoder reads (defaults = the published config,
    ``STEP_VIDEO_SPEC.md`` Appendix B.1). Unknown keys of the file are ignored."""

    hidden_size: int = 6144
    num_attention_heads: int = 48
    num_attention_groups: int = 8
    num_layers: int = 48
    ffn_hidden_size: int = 16896
    padded_vocab_size: int = 65536
    layernorm_epsilon: float = 1e-5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    use_flash_attn: bool = True
    seq_length: int = 16384
    params_dtype: str = "torch.bfloat16"
    embedding_weights_in_fp32: bool = False
    fp32_residual_connection: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "num_attention_groups", "num_layers",
                     "ffn_hidden_size", "padded_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"step_llm config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"step_llm config: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(f"step_llm config: num_attention_heads ({self.num_attention_heads}) must be "
                             f"divisible by num_attention_groups ({self.num_attention_groups})")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"step_llm config: attention_dropout must be in [0, 1), got {self.attention_dropout}")

    @classmethod
    def from_config(cls, config: Union["Step1Config", Mapping[str, Any], Any]) -> "Step1Config":
        """Build from a dict (``config.json``) or any object with those attribute names
        (e.g. a transformers ``PretrainedConfig``); other keys/attributes are ignored."""
        if isinstance(config, cls):
            return config
        names = [f.name for f in fields(cls)]
        if isinstance(config, Mapping):
            values = {n: config[n] for n in names if n in config}
        else:
            values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        if "params_dtype" in values:
            values["params_dtype"] = str(values["params_dtype"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """``ffn_hidden_size`` rounded up to a multiple of 256 (``F'``)."""
        return 256 * ((self.ffn_hidden_size + 255) // 256)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------

class Step1Attention(nn.Module):
    """GQA self-attention with fused ``wqkv = [q (H) | per group (k (D) | v (D))]`` rows."""

    def __init__(self, cfg: Step1Config, device=None, dtype=None):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.num_attention_groups
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        kv_rows = 2 * self.num_groups * self.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.hidden_size + kv_rows, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x [L, B, H]`` (sequence first, like the reference) → ``[L, B, H]``."""
        seq_len, batch, hidden = x.shape
        qkv = self.wqkv(x)                                                        # [L, B, H + 2GD]
        q = qkv[..., :hidden].reshape(seq_len, batch, self.num_heads, self.head_dim)
        kv = qkv[..., hidden:].reshape(seq_len, batch, self.num_groups, 2 * self.head_dim)
        k, v = kv[..., :self.head_dim], kv[..., self.head_dim:]                   # [L, B, G, D]
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))                          # [B, L, ·, D]
        out = sqrt_alibi_attention(q, k, v, bias=bias, dropout_p=self.dropout)   # [B, L, N, D]
        out = out.transpose(0, 1).reshape(seq_len, batch, hidden)                # [L, B, N·D]
        return self.wo(out)


class Step1FeedForward(nn.Module):
    """SwiGLU: ``w2(SiLU(gate) · up)`` with ``w1 = [gate | up]`` of width ``2·F'``."""

    def __init__(self, cfg: Step1Config, device=None, dtype=None):
        super().__init__()
        self.ffn_size = cfg.ffn_size
        self.w1 = nn.Linear(cfg.hidden_size, 2 * self.ffn_size, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(self.ffn_size, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).split(self.ffn_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class Step1Layer(nn.Module):
    """Pre-norm block: ``x + Attn(RMSNorm(x))`` then ``x + FFN(RMSNorm(x))``."""

    def __init__(self, cfg: Step1Config, device=None, dtype=None):
        super().__init__()
        # registration order = the checkpoint's key order
        self.attention = Step1Attention(cfg, device=device, dtype=dtype)
        self.feed_forward = Step1FeedForward(cfg, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.attention.wqkv.weight.dtype
        # casts are no-ops unless fp32_residual_connection keeps the stream in fp32
        x = x + self.attention(self.attention_norm(x).to(weight_dtype), bias)
        x = x + self.feed_forward(self.ffn_norm(x).to(weight_dtype))
        return x


class Step1Transformer(nn.Module):
    def __init__(self, cfg: Step1Config, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(Step1Layer(cfg, device=device, dtype=dtype) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class Step1Embedding(nn.Module):
    def __init__(self, cfg: Step1Config, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.in_fp32 = cfg.embedding_weights_in_fp32
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        weight = self.word_embeddings.weight
        if self.in_fp32:
            weight = weight.float()
        return self.dropout(F.embedding(input_ids, weight).to(out_dtype))


class Step1Model(nn.Module):
    """The Step-LLM (reference name). Keys: ``tok_embeddings.word_embeddings.weight`` and
    ``transformer.layers.{l}.{attention.wqkv, attention.wo, feed_forward.w1, feed_forward.w2,
    attention_norm, ffn_norm}.weight``.

    Args:
        config: a :class:`Step1Config`, a ``config.json`` dict, or an object with those
            attribute names (transformers ``PretrainedConfig``); unknown keys are ignored.
        device: where to create parameters; ``"meta"`` allocates nothing (for streaming loads).
        dtype: parameter dtype (default: torch's default dtype).
    """

    _no_split_modules = ["Step1Layer"]

    def __init__(self, config, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = Step1Config.from_config(config)
        cfg = self.config
        if not cfg.use_flash_attn:
            logger.debug("step_llm config has use_flash_attn=false; the sqrt-ALiBi SDPA path is used anyway")
        if cfg.attention_dropout:
            logger.warning("step_llm config has attention_dropout=%s; like the reference it is applied at "
                           "inference too, so outputs are random", cfg.attention_dropout)
        self.tok_embeddings = Step1Embedding(cfg, device=device, dtype=dtype)
        self.transformer = Step1Transformer(cfg, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids [B, L]`` → hidden states ``[L, B, H]`` (sequence first, like the reference).

        ``attention_mask`` is accepted and, like the reference, ignored: attention is causal over
        all ``L`` positions, so with right padding the valid positions never see padding.
        """
        del attention_mask  # the reference threads it through but never uses it
        weight_dtype = self.transformer.layers[0].attention.wqkv.weight.dtype
        x = self.tok_embeddings(input_ids, weight_dtype).transpose(0, 1)          # [L, B, H]
        if self.config.fp32_residual_connection:
            x = x.float()
        # one (N, L, L) fp32 bias shared by all layers
        bias = sqrt_alibi_bias(self.config.num_attention_heads, x.shape[0], device=x.device)
        return self.transformer(x, bias)                                          # [L, B, H]

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = torch.bfloat16, progress: bool = False) -> "Step1Model":
        """Build on ``meta`` from ``<model_dir>/config.json`` and stream the safetensors shards
        (``model-0000k-of-0000n.safetensors`` + index, or ``model.safetensors``) straight to
        ``device``/``dtype``; ``dtype=None`` keeps the stored dtype."""

        model_dir = Path(model_dir)
        config = read_json(model_dir / layout.LLM_CONFIG)
        files = find_weight_files(model_dir, layout.LLM_WEIGHTS)
        model = cls(config, device="meta")
        load_files_into_model(model, files, dtype=dtype, device=device, strict=True, progress=progress)
        return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------
# Facade
# ----------------------------------------------------------------------------------------

class STEP1TextEncoder(nn.Module):
    """Tokenizer + :class:`Step1Model` (reference name and positional args).

    Args:
        model_dir: the ``step_llm`` folder (``config.json``, safetensors shards,
            ``step1_chat_tokenizer.model``).
        max_length: tokens per prompt (320 in the reference).
        device, dtype: where and in which dtype the weights are loaded (bf16 like upstream).
    """

    def __init__(self, model_dir: Union[str, os.PathLike], max_length: int = 320, *,
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.bfloat16,
                 progress: bool = False):
        super().__init__()

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"step_llm folder not found: {model_dir}")
        self.max_length = int(max_length)
        # tokenizer first: a broken tokenizer fails fast, before 40 GB of weights are read
        self.text_tokenizer = Wrapped_StepChatTokenizer(model_dir / layout.LLM_TOKENIZER_FILE)
        self.text_encoder = Step1Model.from_pretrained(model_dir, device=device, dtype=dtype, progress=progress)

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike], max_length: int = 320, *,
                        device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.bfloat16,
                        progress: bool = False) -> "STEP1TextEncoder":
        """Same as the constructor; ``model_dir`` may also be a Hub repo id of the folder."""

        return cls(resolve_model_dir(model_dir), max_length, device=device, dtype=dtype, progress=progress)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.tok_embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.tok_embeddings.word_embeddings.weight.dtype

    @torch.no_grad()
    def forward(self, prompts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (B strings) → ``(y [B, L, H]`` in the model dtype, ``mask [B, L]`` int64),
        both on the model's device, ``L = max_length``."""
        tokens = self.text_tokenizer(prompts, max_length=self.max_length)
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        y = self.text_encoder(input_ids, mask)                                      # [L, B, H]
        return y.transpose(0, 1), mask                                              # [B, L, H]

"""``StepVideoModel``: the Step-Video DiT (T2V and TI2V).

Layout letters: B batch, F latent frames, C latent channels, h/w latent rows/columns,
L = F*h*w tokens (frame-major), D model width, Lkv text tokens (77 CLIP + LLM).

Forward, in order: patchify -> AdaLN-single -> caption path (CLIP tokens first) and
cross-attention mask -> [sequence split] -> blocks -> [sequence gather] -> output head ->
unpatchify. The only parallel code here is the three calls on ``self.sequence_parallel``
(see ``parallel_hooks``), which are the identity unless a runtime installs a real one.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ..config import DiTConfig
from ..loading import checkpoint as ckpt
from ..loading import fp8_checkpoint, layout
from ..loading.hub import resolve_model_dir
from .attention import resolve_backend
from .blocks import StepVideoTransformerBlock
from .embeddings import AdaLayerNormSingle, PatchEmbed, PixArtAlphaTextProjection
from .parallel_hooks import LocalSequence
from .rope import RoPE3D

logger = logging.getLogger(__name__)


def text_lengths(encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid context lengths ``[B]`` (int64) from a prefix mask ``[B, Lkv]``.

    The sum is rounded to the mask's dtype like the reference, which sums in that dtype: for a
    bf16 mask, totals above 256 round to even (257 -> 256, 259 -> 260, 397 -> 396). Integer,
    bool and fp32 masks give exact lengths.
    """
    total = encoder_attention_mask.to(torch.float64).sum(dim=1)
    if encoder_attention_mask.is_floating_point():
        total = total.to(encoder_attention_mask.dtype)
    return total.round().to(torch.int64)


def cross_attention_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, 1, max_len]`` with ``True`` for positions ``< lengths[b]``.

    The reference builds ``[B, L, Lkv]`` with identical rows for every query; broadcasting one
    row over queries (and heads) is the same mask without the ``L x Lkv`` memory.
    """
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]


_DEFAULT = DiTConfig()           # the released 30B T2V model: the constructor's defaults


class StepVideoModel(nn.Module):
    """The Step-Video DiT. Defaults are the released 30B configuration.

    Constructor arguments are the reference's; ``attention_backend`` is ours ('auto', 'sdpa',
    'flash'; resolved here, never at import). ``attention_type='parallel'`` (what the official
    config.json sets) uses sequence parallelism when a runtime installs it and behaves as world
    size 1 otherwise; ``'torch'`` forbids installing it.
    """

    _no_split_modules = ["StepVideoTransformerBlock"]
    _keys_to_ignore_on_load_unexpected: List[str] = []
    # Tensor-parallel plan (spec ../shared/spec/STEP_VIDEO_SPEC.md §3.12), read by
    # stepvideo.parallel.tensor: "colwise" linears keep row chunk r of the weight (whole heads,
    # or chunk r of the FFN hidden units); "rowwise" linears keep column chunk r and sum their
    # partial outputs over the TP group. "*" is a block index.
    _tp_plan: Dict[str, str] = {
        "transformer_blocks.*.attn1.wqkv": "colwise",
        "transformer_blocks.*.attn2.wq": "colwise",
        "transformer_blocks.*.attn2.wkv": "colwise",
        "transformer_blocks.*.ff.net.0.proj": "colwise",
        "transformer_blocks.*.attn1.wo": "rowwise",
        "transformer_blocks.*.attn2.wo": "rowwise",
        "transformer_blocks.*.ff.net.2": "rowwise",
    }

    def __init__(
        self,
        num_attention_heads: int = _DEFAULT.num_attention_heads,
        attention_head_dim: int = _DEFAULT.attention_head_dim,
        in_channels: int = _DEFAULT.in_channels,
        out_channels: Optional[int] = _DEFAULT.out_channels,
        num_layers: int = _DEFAULT.num_layers,
        dropout: float = _DEFAULT.dropout,
        patch_size: int = _DEFAULT.patch_size,
        norm_type: str = _DEFAULT.norm_type,
        norm_elementwise_affine: bool = _DEFAULT.norm_elementwise_affine,
        norm_eps: float = _DEFAULT.norm_eps,
        use_additional_conditions: Optional[bool] = _DEFAULT.use_additional_conditions,
        caption_channels: Optional[Union[int, List[int], tuple]] = _DEFAULT.caption_channels,
        attention_type: Optional[str] = _DEFAULT.attention_type,
        *,
        attention_backend: str = "auto",
    ):
        super().__init__()
        config = DiTConfig(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
            patch_size=patch_size, norm_type=norm_type, norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps, use_additional_conditions=bool(use_additional_conditions),
            caption_channels=caption_channels, attention_type=attention_type)
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_dim = config.attention_head_dim
        self.inner_dim = config.inner_dim
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.num_layers = config.num_layers
        self.patch_size = config.patch_size
        self.norm_eps = config.norm_eps
        self.use_additional_conditions = config.use_additional_conditions
        self.attention_type = config.attention_type
        self.attention_backend = resolve_backend(attention_backend)

        D = self.inner_dim
        self.pos_embed = PatchEmbed(config.patch_in_channels, D, patch_size)
        self.transformer_blocks = nn.ModuleList(
            [StepVideoTransformerBlock(D, attention_head_dim) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(D, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(D, use_motion_score=self.use_additional_conditions)

        llm_channels, clip_channels = config.llm_channels, config.clip_channels
        # registration order = the reference's state_dict order
        self.clip_projection = nn.Linear(clip_channels, D) if clip_channels is not None else None
        self.caption_norm = nn.LayerNorm(llm_channels, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.caption_projection = PixArtAlphaTextProjection(llm_channels, D)

        self.rope = RoPE3D()
        self.sequence_parallel = LocalSequence()

    # ------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Union[DiTConfig, Mapping], **overrides) -> "StepVideoModel":
        """Build from a :class:`~stepvideo.config.DiTConfig` or a ``config.json`` dict.

        ``overrides``: architecture fields (e.g. ``attention_type='torch'``) replace config
        values; ``attention_backend`` goes to the constructor. Unknown config keys are kept in
        ``config.extra`` and ignored.
        """
        backend = overrides.pop("attention_backend", "auto")
        if isinstance(config, DiTConfig):
            config = config.replace(**overrides) if overrides else config
        else:
            config = DiTConfig.from_dict(config, **overrides)
        model = cls(**config.model_kwargs(), attention_backend=backend)
        model.config = config          # keeps ``extra`` (diffusers bookkeeping) for saving
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *,
                        torch_dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                        device: Union[str, torch.device] = "cpu", subfolder: Optional[str] = None,
                        revision: Optional[str] = None, progress: bool = False, **overrides) -> "StepVideoModel":
        """Load an official ``transformer/`` folder (or a model dir holding one, or a Hub repo id).

        The model is built on the meta device and every tensor is streamed from the shards
        straight into ``torch_dtype`` on ``device``: peak host memory is one tensor plus the model.
        Missing, unexpected or mis-shaped tensors are reported together by name; git-lfs pointer
        files and truncated shards are detected. ``torch_dtype=None`` keeps the stored dtypes.
        ``overrides`` replace config values (e.g. ``attention_type='torch'``). A folder written by
        ``python -m stepvideo.quantize`` loads its fp8 block linears as stored
        (:mod:`stepvideo.loading.fp8_checkpoint`); the other tensors follow ``torch_dtype``.
        """
        folder, config, files = cls.locate_checkpoint(pretrained_model_name_or_path, subfolder, revision)
        dtype = ckpt.parse_dtype(torch_dtype) if torch_dtype is not None else None
        with torch.device("meta"):
            model = cls.from_config(config, **overrides)
        if fp8_checkpoint.is_fp8_config(config):
            fp8_checkpoint.load_fp8_into_model(model, folder, config, files, dtype=dtype, device=device,
                                               progress=progress)
        else:
            ckpt.load_files_into_model(model, files, dtype=dtype, device=device, strict=True, progress=progress)
        ckpt.assert_materialized(model, f"StepVideoModel from {folder}")
        return model.eval().requires_grad_(False)

    @staticmethod
    def locate_checkpoint(pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None,
                          revision: Optional[str] = None):
        """Resolve a ``transformer/`` folder (or a model dir / Hub repo id holding one).

        Returns ``(folder, config dict, weight files)``; every file is validated (git-lfs
        pointers, truncation) before anything is built.
        """

        folder = resolve_model_dir(pretrained_model_name_or_path, allow_patterns=layout.DIT_PATTERNS,
                                   revision=revision)
        if subfolder:
            folder = folder / subfolder
        elif not (folder / layout.TRANSFORMER_CONFIG).is_file() and (folder / layout.TRANSFORMER_DIR).is_dir():
            folder = folder / layout.TRANSFORMER_DIR
        config = ckpt.read_json(folder / layout.TRANSFORMER_CONFIG)
        files = ckpt.find_weight_files(folder, layout.TRANSFORMER_WEIGHTS)
        for f in files:
            ckpt.check_safetensors_file(f)
        return folder, config, files

    def set_sequence_parallel(self, hooks) -> None:
        """Install sequence-parallel hooks (an object with ``split``/``gather``/``attention``)."""
        if self.attention_type != "parallel" and getattr(hooks, "world_size", 1) > 1:
            raise ValueError("sequence parallelism needs attention_type='parallel' "
                             f"(this model was built with {self.attention_type!r})")
        self.sequence_parallel = hooks if hooks is not None else LocalSequence()

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed.proj.weight.device

    # ------------------------------------------------------------------------------------
    # forward stages
    # ------------------------------------------------------------------------------------
    def _context(self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_2: Optional[torch.Tensor],
                 encoder_attention_mask: Optional[torch.Tensor]):
        """Text tokens -> ``context [B, Lkv, D]`` truncated to the longest valid length, and mask."""
        y = self.caption_projection(self.caption_norm(encoder_hidden_states))       # [B, Ltxt, D]
        if encoder_hidden_states_2 is not None and self.clip_projection is not None:
            clip = self.clip_projection(encoder_hidden_states_2)                    # [B, 77, D]
            y = torch.cat([clip, y], dim=1)                                          # CLIP tokens first
        if encoder_attention_mask is None:
            return y, None
        # lengths are read where the mask lives: the pipeline keeps it on the host, so this read
        # is no device sync (a CUDA mask would stall the GPU here on every step)
        lengths = text_lengths(encoder_attention_mask)
        max_len = min(int(lengths.max()), y.shape[1])
        return y[:, :max_len], cross_attention_mask(lengths.to(y.device), max_len)

    def _head(self, x: torch.Tensor, embedded_timestep: torch.Tensor, frames: int) -> torch.Tensor:
        """``x [B, L, D]`` -> ``[B*F, h*w, C_out]`` with the output modulation from ``E``."""
        b, length, d = x.shape
        x = x.reshape(b * frames, length // frames, d)
        e = embedded_timestep.repeat_interleave(frames, dim=0)                       # [B*F, D]
        shift, scale = (self.scale_shift_table[None] + e[:, None]).chunk(2, dim=1)   # [B*F, 1, D] each
        x = self.norm_out(x) * (1 + scale) + shift
        return self.proj_out(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_hidden_states_2: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[dict] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        fps: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        parallel: bool = True,
        condition_hidden_states: Optional[torch.Tensor] = None,
        motion_score: Optional[float] = None,
    ):
        """Predict the flow velocity.

        Args:
            hidden_states: noisy latents ``[B, F, C, h, w]``.
            encoder_hidden_states: LLM features ``[B, Ltxt, C_llm]``.
            encoder_hidden_states_2: CLIP features ``[B, 77, C_clip]``.
            timestep: flow time in [0, 1) per row, ``[B]`` (a scalar is broadcast); multiplied by
                1000 here in its own dtype.
            encoder_attention_mask: ``[B, 77 + Ltxt]`` prefix mask; only its row sums are used.
            condition_hidden_states: TI2V condition latents ``[B, F, C, h, w]`` (frame 0 = image).
            motion_score: TI2V motion score (float).
            added_cond_kwargs, fps, parallel: accepted for compatibility with the reference; unused.
        Returns:
            ``{"x": out}`` or, with ``return_dict=False``, ``out`` of shape ``[B, F, C_out, h, w]``.
        """
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, F, C, h, w], got shape {list(hidden_states.shape)}")
        if encoder_hidden_states is None or timestep is None:
            raise ValueError("encoder_hidden_states and timestep are required")
        b, frames, _, height, width = hidden_states.shape
        if condition_hidden_states is not None:
            if not self.use_additional_conditions:
                raise ValueError("condition_hidden_states given, but this model was built with "
                                 "use_additional_conditions=False (a T2V checkpoint)")
            hidden_states = torch.cat([hidden_states, condition_hidden_states.to(hidden_states.dtype)], dim=2)
        expected_in = self.pos_embed.proj.in_channels
        if hidden_states.shape[2] != expected_in:
            raise ValueError(f"the patch embedding expects {expected_in} input channels, got "
                             f"{hidden_states.shape[2]}"
                             + (" (TI2V needs condition_hidden_states)" if self.use_additional_conditions else ""))

        # 1. Patchify: [B, F, C, h, w] -> [B, F*h*w, D] (frame-major tokens)
        x = self.pos_embed(hidden_states.to(self.dtype))
        x = x.reshape(b, frames * height * width, -1)

        # 2. AdaLN-single
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=x.device)
        timestep = timestep.reshape(-1).to(x.device)
        if timestep.numel() == 1 and b > 1:
            timestep = timestep.expand(b)
        motion = None
        if self.use_additional_conditions and motion_score is not None:
            motion = torch.as_tensor(motion_score, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        modulation, embedded_timestep = self.adaln_single(timestep, motion)

        # 3. Caption path and cross-attention mask
        context, cross_mask = self._context(encoder_hidden_states.to(x.device, self.dtype),
                                            None if encoder_hidden_states_2 is None
                                            else encoder_hidden_states_2.to(x.device, self.dtype),
                                            encoder_attention_mask)

        # 4. Blocks over this rank's token chunk, RoPE rows sliced identically
        cos, sin = self.rope.tables((frames, height, width), dtype=x.dtype, device=x.device)
        sequence = self.sequence_parallel
        start, stop = sequence.split_range(x.shape[1])
        rope = (cos[start:stop], sin[start:stop])
        x = sequence.split(x)
        for block in self.transformer_blocks:
            x = block(x, context, modulation, cross_mask, rope, self.attention_backend, sequence)
        x = sequence.gather(x)

        # 5. Output head and unpatchify: [B*F, h*w, C] -> [B, F, C, h, w]
        x = self._head(x, embedded_timestep, frames)
        out = x.reshape(b, frames, height, width, self.out_channels).permute(0, 1, 4, 2, 3).contiguous()
        if not return_dict:
            return out
        return {"x": out}

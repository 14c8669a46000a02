"""``StepVideoTransformer3DModel``: our ``StepVideoModel`` as a diffusers model.

It IS :class:`stepvideo.models.dit.StepVideoModel` (same modules, same state-dict keys, same
forward) with diffusers' ``ModelMixin`` (``save_pretrained``, offload calls), ``ConfigMixin``
(``config.json`` via ``register_to_config``) and ``CacheMixin`` (``enable_cache``) mixed in.
Loading goes through our streaming loader (``StepVideoModel.from_pretrained``), so official
``transformer/`` folders, saved folders and sharded files load the same way.
"""
from __future__ import annotations

import os
from typing import List, Optional, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.cache_utils import CacheMixin

from ..models.dit import StepVideoModel
from .cache import prepare_config, refresh_hook_registry, register_block
from .components import drop_loader_kwargs


class StepVideoTransformer3DModel(StepVideoModel, ModelMixin, ConfigMixin, CacheMixin):
    """The Step-Video DiT with diffusers' model, config and cache mixins.

    Forward: ``hidden_states [B, F, C, h, w]`` (+ text ``[B, L, C_llm]``, CLIP ``[B, 77, C_clip]``,
    mask ``[B, 77 + L]``, ``timestep [B]``) -> ``[B, F, C_out, h, w]``, exactly
    :meth:`StepVideoModel.forward`. ``transformer_blocks`` is the diffusers-style block list the
    cache hooks walk; the block class is registered with diffusers' block registry by :meth:`enable_cache`.
    """

    config_name = "config.json"
    ignore_for_config = ["attention_backend"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 128,
        in_channels: int = 64,
        out_channels: Optional[int] = 64,
        num_layers: int = 48,
        dropout: float = 0.0,
        patch_size: int = 1,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        use_additional_conditions: Optional[bool] = False,
        caption_channels: Optional[Union[int, List[int], tuple]] = (6144, 1024),
        attention_type: Optional[str] = "parallel",
        *,
        attention_backend: str = "auto",
    ):
        super().__init__(num_attention_heads, attention_head_dim, in_channels, out_channels, num_layers, dropout,
                         patch_size, norm_type, norm_elementwise_affine, norm_eps, use_additional_conditions,
                         caption_channels, attention_type, attention_backend=attention_backend)

    # ``StepVideoModel`` keeps its DiTConfig in ``self.config``; diffusers reads ``config`` as the
    # registered FrozenDict. Both live side by side: the FrozenDict answers ``.config``.
    @property
    def config(self):
        return self._internal_dict

    @config.setter
    def config(self, value) -> None:
        self.__dict__["dit_config"] = value

    @property
    def dtype(self) -> torch.dtype:
        return StepVideoModel.dtype.fget(self)

    @property
    def device(self) -> torch.device:
        return StepVideoModel.device.fget(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *,
                        torch_dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                        device: Union[str, torch.device] = "cpu", subfolder: Optional[str] = None,
                        revision: Optional[str] = None, progress: bool = False, **kwargs):
        """Load a ``transformer/`` folder (official or saved), a model dir holding one, or a Hub
        repo id, streamed into ``torch_dtype`` on ``device`` (see ``StepVideoModel.from_pretrained``).
        diffusers' loader kwargs (``low_cpu_mem_usage``, ``variant`` ...) are accepted and ignored."""
        return StepVideoModel.from_pretrained.__func__(cls, pretrained_model_name_or_path, torch_dtype=torch_dtype,
                                                       device=device, subfolder=subfolder, revision=revision,
                                                       progress=progress, **drop_loader_kwargs(kwargs))

    def enable_cache(self, config) -> None:
        """diffusers' ``CacheMixin.enable_cache`` after registering our block with its registry
        (First-Block-Cache, MagCache, TaylorSeer; see :func:`stepvideo.diffusers.cache.prepare_config`)."""
        register_block()
        super().enable_cache(prepare_config(config))
        refresh_hook_registry(self)

"""``StepVideoTransformer3DModel``: our ``StepVideoModel`` as a diffusers model.

It IS :class:`stepvideo.models.dit.StepVideoModel` (same modules, same state-dict keys, same
forward) with diffusers' ``ModelMixin`` (``save_pretrained``, offload calls), ``ConfigMixin``
(``config.json`` via ``register_to_config``) and ``CacheMixin`` (``enable_cache``) mixed in.
Loading goes through our streaming loader (``StepVideoModel.from_pretrained``), so official
``transformer/`` folders, saved folders and sharded files load the same way.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional, Union

import torch
from diffusers import ConfigMixin, ModelMixin
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

    def __init__(self, *args, **kwargs):
        """``StepVideoModel``'s constructor arguments; all but ``attention_backend`` go to ``config.json``."""
        super().__init__(*args, **kwargs)
        arguments = inspect.signature(StepVideoModel.__init__).bind(self, *args, **kwargs)
        arguments.apply_defaults()
        self.register_to_config(**{name: value for name, value in arguments.arguments.items()
                                   if name not in ("self", *self.ignore_for_config)})

    # ``StepVideoModel`` keeps its DiTConfig in ``self.config``; diffusers reads ``config`` as the
    # registered FrozenDict. Both live side by side: the FrozenDict answers ``.config``.
    @property
    def config(self):
        return self._internal_dict

    @config.setter
    def config(self, value) -> None:
        self.__dict__["dit_config"] = value

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

"""The other diffusers components: our scheduler, VAE and caption encoders with diffusers'
mixins (``SchedulerMixin`` / ``ModelMixin`` + ``ConfigMixin``), so ``DiffusionPipeline`` can
load and save them. Each is our class itself (subclass), never a second implementation.

Saved layouts are the official ones inside each component folder: ``vae/vae_v2.safetensors``
(+ ``config.json``), and ``caption_encoder/step_llm/`` + ``caption_encoder/hunyuan_clip/``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import save_file

from ..loading import layout
from ..models.vae import AutoencoderKL, iter_checkpoint_items
from ..schedulers.flow_match_euler import FlowMatchDiscreteScheduler
from ..text_encoders.caption import CaptionEncoder

# keys diffusers' loader passes to every component's from_pretrained; ours have no use for them
LOADER_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "low_cpu_mem_usage", "device_map",
                 "max_memory", "offload_folder", "offload_state_dict", "variant", "use_safetensors", "disable_mmap",
                 "quantization_config", "dduf_entries", "use_flashpack", "proxies", "output_loading_info",
                 "provider", "sess_options", "provider_options", "_class_name", "_diffusers_version",
                 "_name_or_path")


def drop_loader_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in LOADER_KWARGS}


def _folder(path: Union[str, os.PathLike], subfolder: Optional[str]) -> Path:
    return Path(path) / subfolder if subfolder else Path(path)


class StepVideoFlowMatchScheduler(FlowMatchDiscreteScheduler, SchedulerMixin, ConfigMixin):
    """``FlowMatchDiscreteScheduler`` (time-shifted flow-matching Euler) as a diffusers scheduler."""

    config_name = layout.SCHEDULER_CONFIG

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, reverse: bool = False, solver: str = "euler"):
        super().__init__(num_train_timesteps=num_train_timesteps, reverse=reverse, solver=solver)

    @property
    def config(self):                      # diffusers' FrozenDict (has .reverse etc. as attributes)
        return self._internal_dict

    @config.setter
    def config(self, value) -> None:       # FlowMatchDiscreteScheduler's own SchedulerConfig
        self.__dict__["scheduler_config"] = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None, **kwargs):
        """``scheduler/scheduler_config.json`` of a model dir, or the scheduler folder itself."""
        return FlowMatchDiscreteScheduler.from_pretrained.__func__(cls, pretrained_model_name_or_path, subfolder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.config)})"


class AutoencoderKLStepVideo(AutoencoderKL, ModelMixin, ConfigMixin):
    """The Step-Video Video-VAE (``AutoencoderKL``) as a diffusers model.

    ``encode(videos [B, T, 3, H, W] in [-1, 1])`` -> latents ``[B, F, C, H/16, W/16]``;
    ``decode(latents)`` -> video ``[B, T, 3, H, W]`` in [-1, 1] (the reference's chunked decode).
    """

    config_name = "config.json"
    ignore_for_config = ["model_path", "weight_dict", "world_size"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, z_channels: int = 64, num_res_blocks: int = 2,
                 model_path=None, weight_dict=None, world_size: int = 1, version: int = 2, encoder_ch: int = 32,
                 encoder_ch_mult: Sequence[int] = (4, 8, 16, 16), decoder_ch: int = 128,
                 decoder_ch_mult: Sequence[int] = (1, 2, 4, 4)):
        super().__init__(in_channels, out_channels, z_channels, num_res_blocks, model_path, weight_dict, world_size,
                         version, encoder_ch, encoder_ch_mult, decoder_ch, decoder_ch_mult)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, *,
                        torch_dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                        device: Union[str, torch.device] = "cpu", **kwargs):
        """A model dir, its ``vae/`` folder (official or saved) or a Hub repo id, in ``torch_dtype``
        (``None``: the stored dtype)."""
        path = _folder(pretrained_model_name_or_path, subfolder)
        return AutoencoderKL.from_pretrained.__func__(cls, path, dtype=torch_dtype, device=device,
                                                      **drop_loader_kwargs(kwargs))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Write the official layout: ``vae_v2.safetensors`` (checkpoint key names) + ``config.json``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        tensors = {key: value.detach().contiguous().cpu() for key, value in iter_checkpoint_items(self)}
        save_file(tensors, str(folder / layout.VAE_V2_FILE))


class StepVideoCaptionEncoder(ModelMixin, ConfigMixin):
    """Step-LLM + HunyuanCLIP (our ``CaptionEncoder``) as one diffusers component.

    ``embedding([prompt, negative]) -> {"y" [2, L, C_llm], "y_mask" [2, 77 + L], "clip_embedding"
    [2, 77, C_clip]}``. The encoders keep the reference dtypes (LLM bf16, CLIP fp32) whatever
    ``torch_dtype`` the pipeline is loaded with. Saved as the official ``step_llm/`` and
    ``hunyuan_clip/`` folders (copied from where they were loaded).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, max_length: int = 320, clip_max_length: int = 77):
        super().__init__()
        self.text_encoder = None
        self.clip = None
        self.source_dir: Optional[Path] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, *,
                        device: Union[str, torch.device] = "cpu", **kwargs) -> "StepVideoCaptionEncoder":
        """A folder holding ``step_llm/`` and ``hunyuan_clip/`` (a model dir or a saved component)."""
        folder = _folder(pretrained_model_name_or_path, subfolder)
        config_file = folder / cls.config_name
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        model = cls(**{name: config[name] for name in ("max_length", "clip_max_length") if name in config})
        encoder = CaptionEncoder.from_pretrained(folder, device=device, max_length=model.config.max_length,
                                                 clip_max_length=model.config.clip_max_length)
        model.text_encoder, model.clip = encoder.text_encoder, encoder.clip
        model.source_dir = Path(folder)
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def embedding(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        return CaptionEncoder(self.text_encoder, self.clip).embedding(prompts)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """``config.json`` + copies of the ``step_llm/`` and ``hunyuan_clip/`` folders loaded from."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        if self.source_dir is None:
            raise ValueError("this caption encoder was not loaded from a folder; nothing to copy")
        for sub in (layout.LLM_DIR, layout.CLIP_DIR):
            if (self.source_dir / sub).resolve() != (folder / sub).resolve():
                shutil.copytree(self.source_dir / sub, folder / sub, dirs_exist_ok=True)

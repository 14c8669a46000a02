"""``StepVideoTextToVideoPipeline`` / ``StepVideoImageToVideoPipeline``: diffusers pipelines.

They are thin: every stage (input checks, prompt encoding, noise, TI2V condition, the CFG +
Euler loop, decode, frame conversion) is :class:`stepvideo.pipelines.pipeline.StepVideoPipeline`'s,
so the numbers are the same by construction. What is added is diffusers' surface:
``from_pretrained`` / ``save_pretrained`` / ``.to()`` / offload, the standard call arguments,
``callback_on_step_end``, ``output_type`` and a :class:`StepVideoPipelineOutput` with ``.frames``.

Defaults are the ``run_parallel.py`` presets (``t2v``, ``ti2v``: steps, guidance, time shift,
frames, size, the magic prompt suffix and negative prompt), and
``generator=torch.Generator(device).manual_seed(s)`` draws the noise of ``run_parallel.py --seed s``
(TI2V: the image latent is sampled with seed ``generator.initial_seed()``, as ``--seed s`` does).

Saving: ``save_pretrained(dir)`` writes the components in the official layout plus a
``model_index.json`` whose ``_class_name`` is ``["pipeline_stepvideo", "<class>"]`` and a
one-line ``pipeline_stepvideo.py`` that imports the class from the installed ``stepvideo``:
that is how stock ``diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``
finds a pipeline class that is not part of diffusers.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..caption_service.client import RemoteCaptionEncoder, RemoteVAE
from ..components import LocalVAE
from ..config import PRESETS
from ..io.frames import decoded_to_frames
from ..loading import layout
from ..loading.hub import resolve_model_dir
from ..pipelines.pipeline import StepVideoPipeline
from .cache import CONTEXT
from .components import AutoencoderKLStepVideo, StepVideoCaptionEncoder, StepVideoFlowMatchScheduler
from .transformer import StepVideoTransformer3DModel

CUSTOM_MODULE = "pipeline_stepvideo"
CUSTOM_MODULE_TEXT = ('"""Step-Video pipelines for stock diffusers: the classes come from the installed '
                      'stepvideo package."""\n'
                      "from stepvideo.diffusers import StepVideoImageToVideoPipeline, "
                      "StepVideoTextToVideoPipeline  # noqa: F401\n")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class StepVideoPipelineOutput(BaseOutput):
    """``frames``: ``np``: float32 ``[B, T, H, W, 3]`` in [0, 1]; ``pil``: ``B`` lists of images;
    ``pt``: float32 ``[B, T, 3, H, W]`` in [0, 1]; ``latent``: fp32 ``[B, F, C, h, w]``."""

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]


def _is_saved_pipeline(folder: Path) -> bool:
    """A folder written by :meth:`save_pretrained` (not an official checkpoint's model_index)."""
    index = folder / layout.MODEL_INDEX
    if not index.is_file():
        return False
    entry = json.loads(index.read_text()).get("transformer") or [None]
    return str(entry[0]).startswith("stepvideo.diffusers")


class _StepVideoDiffusersPipeline(DiffusionPipeline):
    """Shared body of the T2V and TI2V pipelines (see the module docstring)."""

    model_cpu_offload_seq = "caption_encoder->transformer->vae"
    _optional_components = ["vae", "caption_encoder"]
    _callback_tensor_inputs = ["latents"]
    preset = "t2v"

    def __init__(self, transformer: StepVideoTransformer3DModel, scheduler: StepVideoFlowMatchScheduler,
                 vae: Optional[AutoencoderKLStepVideo] = None,
                 caption_encoder: Optional[StepVideoCaptionEncoder] = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, caption_encoder=caption_encoder)
        self.caption_url: Optional[str] = None
        self.vae_url: Optional[str] = None
        self.service_token: Optional[str] = None

    # ------------------------------------------------------------------------------------
    # loading and saving
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """An official checkpoint folder or Hub repo id (no ``model_index.json`` needed), or a
        folder written by :meth:`save_pretrained`.

        ``torch_dtype`` (default bf16 for official folders) applies to the transformer and VAE, or
        per component as a dict (``{"transformer": torch.float32, "default": torch.bfloat16}``);
        the text encoders keep the reference dtypes. Components given as keywords (``vae=None``,
        ``caption_encoder=None``) replace or skip the stored ones: without them, use
        :meth:`setup_service` or pass ``prompt_embeds``.
        """
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and _is_saved_pipeline(folder):
            if (folder / f"{CUSTOM_MODULE}.py").read_text() == CUSTOM_MODULE_TEXT:
                kwargs.setdefault("trust_remote_code", True)       # our own one-line import module
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_checkpoint(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_checkpoint(cls, model_dir: Union[str, os.PathLike], *, torch_dtype=torch.bfloat16,
                        device: Union[str, torch.device] = "cpu", **components):
        """Build from the official layout (``transformer/``, ``scheduler/``, ``vae/``,
        ``step_llm/`` + ``hunyuan_clip/``); absent text-encoder / VAE folders leave them ``None``."""

        def dtype(name):
            if isinstance(torch_dtype, dict):
                return torch_dtype.get(name, torch_dtype.get("default", torch.bfloat16))
            return torch_dtype

        root = resolve_model_dir(model_dir, allow_patterns=layout.DIT_PATTERNS + layout.SERVICE_PATTERNS
                                 + [f"{layout.VAE_DIR}/*"])
        if "transformer" not in components:
            components["transformer"] = StepVideoTransformer3DModel.from_pretrained(
                root, torch_dtype=dtype("transformer"), device=device)
        if "scheduler" not in components:
            components["scheduler"] = StepVideoFlowMatchScheduler.from_pretrained(root)
        if "vae" not in components:
            has_vae = (root / layout.VAE_DIR / layout.VAE_V2_FILE).is_file()
            components["vae"] = AutoencoderKLStepVideo.from_pretrained(
                root, subfolder=layout.VAE_DIR, torch_dtype=dtype("vae"), device=device) if has_vae else None
        if "caption_encoder" not in components:
            has_text = (root / layout.LLM_DIR).is_dir() and (root / layout.CLIP_DIR).is_dir()
            components["caption_encoder"] = StepVideoCaptionEncoder.from_pretrained(root, device=device) \
                if has_text else None
        return cls(**components)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """diffusers' save, then the custom-pipeline entry stock ``DiffusionPipeline`` needs."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        index_file = folder / layout.MODEL_INDEX
        index = json.loads(index_file.read_text())
        index["_class_name"] = [CUSTOM_MODULE, type(self).__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (folder / f"{CUSTOM_MODULE}.py").write_text(CUSTOM_MODULE_TEXT)

    def setup_service(self, caption_url: Optional[str] = None, vae_url: Optional[str] = None,
                      token: Optional[str] = None) -> None:
        """Use the caption/VAE service (``stepvideo.caption_service``) for the parts not held in-process."""
        self.caption_url, self.vae_url, self.service_token = caption_url, vae_url, token

    # ------------------------------------------------------------------------------------
    def _stages(self) -> StepVideoPipeline:
        """Our pipeline over these components: the stages every number comes from."""

        caption = self.caption_encoder
        if caption is None and self.caption_url:
            caption = RemoteCaptionEncoder(self.caption_url, token=self.service_token)
        vae = LocalVAE(self.vae) if self.vae is not None else None
        if vae is None and self.vae_url:
            vae = RemoteVAE(self.vae_url, token=self.service_token, output="uint8")
        return StepVideoPipeline(self.transformer, self.scheduler, caption_encoder=caption, vae=vae)

    @staticmethod
    def _frames(frames: np.ndarray, output_type: str):
        """``uint8 [T, H, W, 3]`` (as ``run_parallel.py`` writes) -> the requested format (batch 1)."""
        if output_type == "pil":
            return [[PIL.Image.fromarray(frame) for frame in frames]]
        scaled = frames[None].astype(np.float32) / 255.0                      # [1, T, H, W, 3]
        return torch.from_numpy(scaled).permute(0, 1, 4, 2, 3).contiguous() if output_type == "pt" else scaled

    def _generate(self, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                  time_shift, pos_magic, generator, latents, prompt_embeds, output_type, return_dict,
                  callback_on_step_end, callback_on_step_end_tensor_inputs, crop_540p, image=None,
                  motion_score=None, condition_latents=None):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` may hold {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        if isinstance(generator, list):
            if len(generator) != 1:
                raise ValueError(f"one video per call: pass one generator, got {len(generator)}")
            generator = generator[0]
        preset = PRESETS[self.preset]
        pick = lambda value, name: getattr(preset, name) if value is None else value      # noqa: E731
        stages = self._stages()
        height, width, num_frames = stages.check_inputs(pick(height, "height"), pick(width, "width"),
                                                        pick(num_frames, "num_frames"))
        y, y_mask, clip = stages.encode_prompt(prompt, pick(pos_magic, "pos_magic"),
                                               pick(negative_prompt, "neg_magic"), prompt_embeds)
        shape = stages.latent_shape(height, width, num_frames)
        latents = stages.prepare_latents(shape, latents, generator=generator)
        condition = None
        if stages.is_ti2v:
            seed = generator.initial_seed() if generator is not None else None
            if isinstance(image, np.ndarray):
                image = PIL.Image.fromarray(image)
            condition = stages.prepare_condition(shape, image, condition_latents, seed=seed)

        def on_step(i, t, step_latents):
            if callback_on_step_end is None:
                return
            names = callback_on_step_end_tensor_inputs or []
            result = callback_on_step_end(self, i, t, {name: step_latents for name in names}) or {}
            if result.get("latents") is not None:
                step_latents.copy_(result["latents"])              # the loop goes on from the new latents

        cache = self.transformer.cache_context(CONTEXT) if self.transformer.is_cache_enabled else nullcontext()
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        try:
            with cache:
                latents = stages.denoise(latents, y, y_mask, clip, pick(num_inference_steps, "num_inference_steps"),
                                         pick(guidance_scale, "guidance_scale"), pick(time_shift, "time_shift"),
                                         condition, pick(motion_score, "motion_score"), on_step,
                                         progress=progress)
        finally:
            if self.transformer.is_cache_enabled:
                self.transformer._reset_stateful_cache()
        if output_type == "latent":
            frames = latents
        else:
            frames = self._frames(decoded_to_frames(stages.decode(latents), crop_540p=crop_540p), output_type)
        self.maybe_free_model_hooks()
        return StepVideoPipelineOutput(frames=frames) if return_dict else (frames,)


class StepVideoTextToVideoPipeline(_StepVideoDiffusersPipeline):
    """Step-Video-T2V (and Turbo) text-to-video.

    Example::

        pipe = StepVideoTextToVideoPipeline.from_pretrained("stepfun-ai/stepvideo-t2v", torch_dtype=torch.bfloat16)
        pipe.to("cuda")
        frames = pipe("a red fox running through snow", generator=torch.Generator("cuda").manual_seed(0)).frames[0]
        export_to_video(frames, "fox.mp4", fps=25)
    """

    @torch.no_grad()
    def __call__(self, prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 time_shift: Optional[float] = None, pos_magic: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[Dict[str, torch.Tensor]] = None, output_type: str = "np",
                 return_dict: bool = True, callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, crop_540p: bool = True):
        """Generate one video.

        ``None`` arguments take the ``t2v`` preset of ``run_parallel.py`` (50 steps, guidance 9,
        time shift 13, 204 frames at 544x992, its magic suffix ``pos_magic`` and negative prompt).
        ``prompt_embeds``: ``{"y", "y_mask", "clip_embedding"}`` with rows [prompt, negative]
        instead of the caption encoder. ``latents``: initial noise ``[1, F, C, h, w]``.
        ``callback_on_step_end(pipe, step, t, {"latents": ...})`` may return new ``latents``.
        ``crop_540p``: the reference's 540p centre crop of 544-row videos (as ``run_parallel.py``).
        """
        return self._generate(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                              guidance_scale, time_shift, pos_magic, generator, latents, prompt_embeds, output_type,
                              return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, crop_540p)


class StepVideoImageToVideoPipeline(_StepVideoDiffusersPipeline):
    """Step-Video-TI2V image-to-video (``image`` is the first frame, ``motion_score`` its motion)."""

    preset = "ti2v"

    @torch.no_grad()
    def __call__(self, image=None, prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 time_shift: Optional[float] = None, motion_score: Optional[float] = None,
                 pos_magic: Optional[str] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[Dict[str, torch.Tensor]] = None,
                 condition_latents: Optional[torch.Tensor] = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, crop_540p: bool = True):
        """Generate one video from ``image`` (PIL image, ``uint8 [H, W, 3]`` array, tensor or path).

        ``None`` arguments take the ``ti2v`` preset (102 frames, time shift 12.573, motion 5, ...).
        ``condition_latents``: the encoded image ``[1, 1, C, h, w]`` instead of ``image``.
        Other arguments as :meth:`StepVideoTextToVideoPipeline.__call__`.
        """
        return self._generate(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                              guidance_scale, time_shift, pos_magic, generator, latents, prompt_embeds, output_type,
                              return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, crop_540p,
                              image=image, motion_score=motion_score, condition_latents=condition_latents)

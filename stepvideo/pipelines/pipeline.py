"""``StepVideoPipeline``: text-to-video and image-to-video sampling
(spec ``../shared/spec/STEP_VIDEO_SPEC.md`` §5).

Three stages, and ``__call__`` is these three calls, top to bottom:

1. :meth:`~StepVideoPipeline.encode_inputs` (rank 0): prompt embeddings from the caption encoder
   (or precomputed ones) and, for TI2V, the first image's latent -> :class:`EncodedInputs`;
2. :meth:`~StepVideoPipeline.denoise_inputs` (every rank): noise, then the CFG + Euler loop
   (:meth:`~StepVideoPipeline.denoise`) -> latents;
3. :meth:`~StepVideoPipeline.write_video` (rank 0): decode, post-process, write the mp4, retried;
   when every attempt fails the latents are kept next to the intended output
   (``<name>.latents.safetensors``, see :mod:`stepvideo.decode`) and it raises ``GenerationError``.

The caption encoder and the VAE are components (:mod:`stepvideo.components`): local models, the
service's clients and the memory profile's on-demand components have the same methods, so the
pipeline never asks which one it holds.

The mode follows the transformer: a model built with ``use_additional_conditions=True`` (the
TI2V checkpoint) needs a first image (or precomputed condition latents) and a motion score.

Numerics follow the reference: noise drawn in bf16 from a fresh default-seeded generator on
the execution device unless a seed/generator is given; latents cast to bf16 on entry, fp32 after
the first Euler step and re-cast to the transformer dtype each step; CFG evaluated in the model
dtype; text mask cast to the model dtype (bf16 length rounding).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import geometry
from ..caption_service.client import RemoteCaptionEncoder, RemoteVAE
from ..components import check_vae_output
from ..config import PIPELINE_CALL_DEFAULTS, PIPELINE_CALL_TI2V_FRAMES, OutputConfig, SamplingConfig
from ..errors import GenerationError, one_line
from ..io.frames import decoded_to_frames
from ..io.image import prepare_first_image
from ..io.video import output_video_path
from ..loading import layout
from ..loading.hub import resolve_model_dir
from ..models.dit import StepVideoModel
from ..schedulers.flow_match_euler import FlowMatchDiscreteScheduler
from ..timing import StageTimer
from ..vae.codec import latents_to_mp4
from ..vae.latents_file import latents_path, run_metadata, save_latents
from .outputs import StepVideoPipelineOutput

logger = logging.getLogger(__name__)


class _Default:
    """A reference default of ``__call__`` that ``sampling=`` replaces; shown as the plain value."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _pick(value, name: str, sampling: Optional[SamplingConfig]):
    """An explicit argument wins; else the ``sampling`` field; else the reference default."""
    if not isinstance(value, _Default):
        return value
    return getattr(sampling, name) if sampling is not None else value.value


@dataclass(frozen=True)
class EncodedInputs:
    """Stage 1's result, handed to every rank (CPU tensors, broadcast from rank 0).

    ``embeds``: ``{"y": [2, L, C], "y_mask": [2, 77 + L], "clip_embedding": [2, 77, C']}`` rows
    ``[prompt + pos_magic, neg_magic]``; ``condition``: TI2V first-image latent ``[1, 1, C, h, w]``.
    """

    embeds: dict
    condition: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class KeepLatents:
    """The write stage's failure policy: ``retries`` extra decode/write attempts with exponential
    ``backoff`` seconds, then the latents are saved and the error says how to decode them
    (``decode_flag``: ``--vae_url URL`` or ``--model_dir DIR``)."""

    retries: int = 0
    backoff: float = 2.0
    decode_flag: str = "--model_dir <checkpoint>"
    decoder: str = "local"                 # latents-file metadata: "local" or "service-uint8"
    model_dir: str = ""


class StepVideoPipeline:
    """Sampling pipeline; constructor arguments are the reference's plus keyword-only extras.

    Args:
        transformer: ``StepVideoModel`` (or any callable with the same forward, e.g. a
            CFG-parallel wrapper exposing ``dtype``, ``device`` and ``use_additional_conditions``).
        scheduler: ``FlowMatchDiscreteScheduler``.
        vae_url, caption_url: the service's address (``http://host:port`` or a bare host meaning
            port 8080), used when no local ``vae`` / ``caption_encoder`` is given.
        save_path, name_suffix: where mp4 files go and an optional name suffix.
        caption_encoder: a :class:`~stepvideo.components.CaptionEncoderComponent`
            (``CaptionEncoder``, ``PlacedCaptionEncoder`` or ``RemoteCaptionEncoder``); None: the
            service at ``caption_url``.
        vae: a :class:`~stepvideo.components.VAEComponent` (``AutoencoderKL``, ``LocalVAE``,
            ``PlacedVAE`` or ``RemoteVAE``); None: the service at ``vae_url``.
        vae_output: decode format of the service client built by :meth:`setup_api`: ``"float"``
            or ``"uint8"`` (converted on the server: half the bytes, the same frames).
        rank: global rank; only rank 0 decodes, writes files and shows progress.
        source: how messages name the checkpoint (its folder).
        keep_latents: the write stage's retry / keep-the-latents policy (:class:`KeepLatents`).
    """

    vae_scale_factor_temporal = geometry.TEMPORAL_COMPRESSION
    vae_scale_factor_spatial = geometry.SPATIAL_COMPRESSION

    def __init__(self, transformer, scheduler, vae_url: str = "127.0.0.1", caption_url: str = "127.0.0.1",
                 save_path: str = "./results", name_suffix: str = "", *, caption_encoder=None, vae=None,
                 rank: int = 0, service_token: Optional[str] = None, vae_output: str = "float",
                 source: str = "this model", keep_latents: KeepLatents = KeepLatents()):
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae_url = vae_url
        self.caption_url = caption_url
        self.save_path = save_path
        self.name_suffix = name_suffix
        self.caption_encoder = caption_encoder
        self.vae = vae
        self.rank = rank
        self.service_token = service_token
        self.vae_output = check_vae_output(vae_output)
        self.source = source
        self.keep_latents = keep_latents

    # ------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike], *, torch_dtype=torch.bfloat16,
                        device: Union[str, torch.device] = "cpu", **kwargs) -> "StepVideoPipeline":
        """Load ``transformer/`` and ``scheduler/`` of a model dir (or Hub repo id)."""
        root = resolve_model_dir(model_dir, allow_patterns=layout.DIT_PATTERNS)
        transformer = StepVideoModel.from_pretrained(root, torch_dtype=torch_dtype, device=device,
                                                     progress=kwargs.pop("progress", False))
        scheduler = FlowMatchDiscreteScheduler.from_pretrained(root)
        return cls(transformer, scheduler, **kwargs)

    def setup_api(self, vae_url: str, caption_url: str) -> None:
        """Point the pipeline at a running caption/VAE service (the reference's method)."""

        self.vae_url, self.caption_url = vae_url, caption_url
        self.caption_encoder = RemoteCaptionEncoder(caption_url, token=self.service_token)
        self.vae = RemoteVAE(vae_url, token=self.service_token, output=self.vae_output)

    def to(self, device=None, dtype=None) -> "StepVideoPipeline":
        self.transformer.to(device=device, dtype=dtype)
        return self

    @property
    def is_ti2v(self) -> bool:
        return bool(getattr(self.transformer, "use_additional_conditions", False))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _caption(self):
        if self.caption_encoder is None:
            self.setup_api(self.vae_url, self.caption_url)
        return self.caption_encoder

    def _vae(self):
        if self.vae is None:
            self.setup_api(self.vae_url, self.caption_url)
        return self.vae

    # ------------------------------------------------------------------------------------
    # stages
    # ------------------------------------------------------------------------------------
    @staticmethod
    def check_inputs(height: int, width: int, num_frames: int):
        """Round sizes down (frames to a multiple of 17, sides to multiples of 16) with a warning;
        raise for values below the minimum. Returns ``(height, width, num_frames)``."""
        side = geometry.SPATIAL_COMPRESSION
        for name, value, minimum in (("num_frames", num_frames, geometry.FRAMES_PER_CHUNK),
                                     ("height", height, side), ("width", width, side)):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
        frames = geometry.round_frames(num_frames)
        h, w = geometry.round_size(height), geometry.round_size(width)
        if frames != num_frames:
            warnings.warn(f"num_frames={num_frames} is not a multiple of 17; using {frames}", stacklevel=3)
        if (h, w) != (height, width):
            warnings.warn(f"height/width {height}x{width} are not multiples of 16; using {h}x{w}", stacklevel=3)
        return h, w, frames

    def latent_shape(self, height: int, width: int, num_frames: int, batch: int = 1):
        """``[B, F, C, h, w]`` noise shape; ``C`` is the transformer's ``in_channels``."""
        channels = getattr(self.transformer, "in_channels", 64)
        return geometry.latent_shape(height, width, num_frames, channels=channels, batch=batch)

    def encode_prompt(self, prompt: str, pos_magic: str = "", neg_magic: str = "", prompt_embeds=None):
        """``[prompt + pos_magic, neg_magic]`` -> ``(y [2, L, C], y_mask [2, 77 + L], clip [2, 77, C'])``
        in the transformer dtype; ``y`` and ``clip`` on the execution device, the mask on the host
        (the DiT reads its lengths there: no device sync per step)."""
        prompt_embeds = self._prompt_embeds(prompt, pos_magic, neg_magic, prompt_embeds)
        missing = {"y", "y_mask", "clip_embedding"} - set(prompt_embeds)
        if missing:
            raise ValueError(f"prompt_embeds lacks {sorted(missing)}")
        y, mask, clip = prompt_embeds["y"], prompt_embeds["y_mask"], prompt_embeds["clip_embedding"]
        if y.shape[0] != 2 or mask.shape[0] != 2 or clip.shape[0] != 2:
            raise ValueError("prompt embeddings must hold 2 rows [conditional, unconditional], got "
                             f"{y.shape[0]}, {mask.shape[0]}, {clip.shape[0]}")
        if mask.shape[1] != clip.shape[1] + y.shape[1]:
            raise ValueError(f"y_mask has {mask.shape[1]} columns, expected clip {clip.shape[1]} + text {y.shape[1]}")
        device, dtype = self.device, self.dtype
        return y.to(device, dtype), mask.to(dtype=dtype), clip.to(device, dtype)

    def _prompt_embeds(self, prompt, pos_magic: str, neg_magic: str, prompt_embeds) -> dict:
        """The caption encoder's ``{"y", "y_mask", "clip_embedding"}`` of ``[prompt + pos_magic,
        neg_magic]``, or the given ``prompt_embeds`` (a dict, or a tuple in that order) as a dict."""
        if prompt_embeds is None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"`prompt` must be a non-empty string, got {prompt!r}")
            return self._caption().embedding([prompt + pos_magic, neg_magic])
        if isinstance(prompt_embeds, (tuple, list)):
            return dict(zip(("y", "y_mask", "clip_embedding"), prompt_embeds))
        return prompt_embeds

    def prepare_latents(self, shape, latents: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Initial noise in bf16 (the reference's dtype, whatever the transformer dtype).

        Given ``latents`` are only moved and cast. Otherwise noise is drawn from ``generator``, or
        a generator seeded with ``seed``, or, with neither, a FRESH generator with PyTorch's
        default seed on the execution device: the reference's behaviour (its ``--seed`` does not
        reach the noise, so every run starts from the same noise for a given shape).
        """
        device = self.device
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
            return latents.to(device=device, dtype=torch.bfloat16)
        if generator is None:
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device)

    def prepare_condition(self, shape, first_image=None, condition_latents: Optional[torch.Tensor] = None,
                          seed: Optional[int] = None) -> torch.Tensor:
        """TI2V condition ``[2 * B, F, C, h, w]`` bf16: frame 0 = image latent, zeros after,
        identical for both CFG rows."""
        b, frames, channels, h, w = shape
        if condition_latents is None:
            side = geometry.SPATIAL_COMPRESSION
            condition_latents = self._encode_first_image(first_image, h * side, w * side, seed)
        cond = condition_latents.detach().to("cpu")
        if cond.ndim != 5 or tuple(cond.shape[2:]) != (channels, h, w):
            raise ValueError(f"condition latents must be [B, 1 | F, {channels}, {h}, {w}], got {list(cond.shape)}")
        if cond.shape[1] == 1:
            cond = cond.repeat(b // cond.shape[0], 1, 1, 1, 1)
            zeros = torch.zeros(b, frames - 1, channels, h, w, dtype=torch.float32)
            cond = torch.cat([cond, zeros], dim=1)
        elif cond.shape[1] != frames:
            raise ValueError(f"condition latents have {cond.shape[1]} frames, expected 1 or {frames}")
        return torch.cat([cond, cond], dim=0).to(self.device, torch.bfloat16)

    def _encode_first_image(self, first_image, height: int, width: int, seed: Optional[int]) -> torch.Tensor:
        if first_image is None:
            raise ValueError(f"{self.source} is an image-to-video (TI2V) checkpoint: pass a first image "
                             "(`first_image`, --first_image_path) or precomputed `condition_latents`")
        image = prepare_first_image(first_image, height, width)
        return encode_image(self._vae(), image, seed).cpu()

    def denoise(self, latents, y, y_mask, clip, num_inference_steps: int, guidance_scale: float,
                time_shift: float, condition=None, motion_score: Optional[float] = None,
                callback: Optional[Callable] = None, progress: bool = True) -> torch.Tensor:
        """The CFG + Euler loop; returns the final latents (fp32)."""
        do_cfg = guidance_scale > 1
        if not do_cfg:        # the reference sends batch-2 text anyway and fails; we use the cond row
            y, y_mask, clip = y[:1], y_mask[:1], clip[:1]
            condition = condition[:1] if condition is not None else None
        self.scheduler.set_timesteps(num_inference_steps, time_shift=time_shift, device=self.device)
        extra = {}
        if self.is_ti2v:
            extra = {"condition_hidden_states": condition, "motion_score": float(motion_score)}
        steps = self.scheduler.timesteps
        for i, t in enumerate(tqdm(steps, desc="denoising", disable=not progress or self.rank != 0)):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = model_input.to(self.dtype)
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
            with torch.no_grad():
                out = self.transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=y,
                                       encoder_hidden_states_2=clip, encoder_attention_mask=y_mask,
                                       return_dict=False, **extra)
            if do_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents)
            if callback is not None:
                callback(i, t, latents)
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, F, C, h, w]`` -> video ``[B, T, 3, H, W]`` in the VAE component's format
        (float in the VAE dtype, or uint8)."""
        return self._vae().decode(latents.detach().float())

    # ------------------------------------------------------------------------------------
    # the three stages
    # ------------------------------------------------------------------------------------
    def encode_inputs(self, prompt: Optional[str], sampling: SamplingConfig, first_image=None, *,
                      prompt_embeds=None, condition_latents: Optional[torch.Tensor] = None,
                      timer: Optional[StageTimer] = None) -> EncodedInputs:
        """Stage 1 (rank 0): ``[prompt + pos_magic, neg_magic]`` through the caption encoder (unless
        ``prompt_embeds`` are given) and, for TI2V, ``first_image`` through the VAE (unless
        ``condition_latents`` are given; sized to ``sampling``'s rounded height and width)."""
        if timer is not None:
            timer.begin("encoding")
        if first_image is not None and not self.is_ti2v:
            raise ValueError(f"a first image was given ({first_image}), but {self.source} is a text-to-video "
                             "(T2V) checkpoint; use a Step-Video-TI2V checkpoint or drop the image")
        prompt_embeds = self._prompt_embeds(prompt, sampling.pos_magic, sampling.neg_magic, prompt_embeds)
        condition = condition_latents
        if self.is_ti2v and condition is None:
            condition = self._encode_first_image(first_image, geometry.round_size(sampling.height),
                                                 geometry.round_size(sampling.width), sampling.seed)
        return EncodedInputs(embeds=prompt_embeds, condition=condition)

    def denoise_inputs(self, inputs: EncodedInputs, sampling: SamplingConfig, *,
                       latents: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                       callback: Optional[Callable] = None, progress: bool = True,
                       timer: Optional[StageTimer] = None) -> torch.Tensor:
        """Stage 2 (every rank): the initial noise (or ``latents``), the TI2V condition, then
        :meth:`denoise` (the loop); returns the final latents ``[1, F, C, h, w]`` (fp32).
        ``callback(step, t, latents)`` runs after each step."""
        y, y_mask, clip = self.encode_prompt(None, prompt_embeds=inputs.embeds)
        shape = self.latent_shape(sampling.height, sampling.width, sampling.num_frames)
        latents = self.prepare_latents(shape, latents, seed=sampling.seed, generator=generator)
        condition = None
        if self.is_ti2v:
            condition = self.prepare_condition(shape, None, inputs.condition, seed=sampling.seed)
        if timer is not None:
            timer.begin("denoising", total_steps=sampling.num_inference_steps)

        def after_step(i, t, step_latents):
            if timer is not None:
                timer.step(i)
            if callback is not None:
                callback(i, t, step_latents)

        return self.denoise(latents, y, y_mask, clip, sampling.num_inference_steps, sampling.guidance_scale,
                                sampling.time_shift, condition, sampling.motion_score, after_step, progress)

    def write_video(self, latents: torch.Tensor, path: Union[str, os.PathLike], output: OutputConfig, *,
                    prompt: str, sampling: SamplingConfig, timer: Optional[StageTimer] = None):
        """Stage 3 (rank 0): decode, post-process and write ``path`` atomically; returns the
        ``uint8 [T, H, W, 3]`` frames written. Retried per :attr:`keep_latents`; when every attempt
        failed the latents are saved next to ``path`` and :class:`~stepvideo.errors.GenerationError`
        says where and how to make the video from them."""
        policy = self.keep_latents
        on_stage = timer.begin if timer is not None else None
        attempts = max(0, policy.retries) + 1
        for attempt in range(attempts):
            try:
                frames = latents_to_mp4(self.decode, latents, path, output, on_stage=on_stage)[1]
                logger.info("Saved the generated video in %s", path)
                return frames
            except Exception as exc:         # retried, then the latents are kept
                failure = exc
                if attempt + 1 < attempts:
                    delay = policy.backoff * 2 ** attempt
                    logger.warning("decoding/writing %s failed (%s: %s); retry %d of %d in %.0f s", path,
                                   type(exc).__name__, exc, attempt + 1, attempts - 1, delay)
                    time.sleep(delay)
        metadata = run_metadata(prompt, sampling, output, video_path=str(path), decoder=policy.decoder,
                                model_dir=policy.model_dir)
        saved = save_latents(latents_path(path), latents.detach().float(), metadata)
        logger.warning("saved the denoised latents in %s", saved)
        raise GenerationError(f"{one_line(failure)}; the denoised latents are saved in {saved}: make the video "
                              f"with `python -m stepvideo.decode {saved} {policy.decode_flag}`") from failure

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[str] = None,
        height: int = _Default(PIPELINE_CALL_DEFAULTS.height),
        width: int = _Default(PIPELINE_CALL_DEFAULTS.width),
        num_frames: Optional[int] = _Default(None),
        num_inference_steps: int = _Default(PIPELINE_CALL_DEFAULTS.num_inference_steps),
        guidance_scale: float = _Default(PIPELINE_CALL_DEFAULTS.guidance_scale),
        time_shift: float = _Default(PIPELINE_CALL_DEFAULTS.time_shift),
        neg_magic: str = _Default(PIPELINE_CALL_DEFAULTS.neg_magic),
        pos_magic: str = _Default(PIPELINE_CALL_DEFAULTS.pos_magic),
        num_videos_per_prompt: Optional[int] = 1,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "mp4",
        output_file_name: Optional[str] = "",
        return_dict: bool = True,
        first_image=None,
        motion_score: float = _Default(PIPELINE_CALL_DEFAULTS.motion_score),
        *,
        sampling: Optional[SamplingConfig] = None,
        seed: Optional[int] = _Default(None),
        prompt_embeds=None,
        condition_latents: Optional[torch.Tensor] = None,
        output_path: Optional[Union[str, os.PathLike]] = None,
        callback: Optional[Callable] = None,
        progress: bool = True,
        output: Optional[OutputConfig] = None,
        on_stage: Optional[Callable[[str], None]] = None,
    ):
        """Generate one video.

        ``sampling``: a :class:`~stepvideo.config.SamplingConfig` (e.g. a preset) giving every
        sampling value at once: sizes, steps, guidance, time shift, magic prompts, motion score
        and seed. An explicitly passed keyword argument wins over its ``sampling`` field (the
        rule of the CLI presets); without ``sampling`` the reference defaults apply
        (:data:`stepvideo.config.PIPELINE_CALL_DEFAULTS`).

        Reference arguments keep their defaults (``num_frames`` defaults to 204 for T2V and 102
        for TI2V models). Extras: ``seed`` (seeds the noise and the TI2V image encoding; without
        it the reference's fixed noise is used), ``prompt_embeds`` (dict or tuple of
        ``y, y_mask, clip_embedding`` instead of calling the caption encoder),
        ``condition_latents`` (TI2V: encoded first image ``[1, 1, C, h, w]``), ``output_path``
        (explicit mp4 path), ``callback(step, t, latents)``, ``on_stage(name)`` (rank 0, called with
        ``"decoding"`` and ``"writing"`` as those stages start), ``output`` (an
        :class:`~stepvideo.config.OutputConfig`: folder, file name, fps, crop, denoise filter;
        ``output_file_name`` / ``output_path`` given here win over its fields).

        ``output_type``: ``"mp4"`` (decode, write a file, return frames), ``"np"`` (decode, return
        frames, no file), ``"latent"`` (return the fp32 latents).
        """
        if output_type not in ("mp4", "np", "latent"):
            raise ValueError(f"output_type must be 'mp4', 'np' or 'latent', got {output_type!r}")
        if num_videos_per_prompt not in (None, 1):
            raise ValueError("num_videos_per_prompt must be 1 (the text batch is [cond, uncond])")
        settings = self._call_settings(sampling, height=height, width=width, num_frames=num_frames,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       time_shift=time_shift, pos_magic=pos_magic, neg_magic=neg_magic,
                                       motion_score=motion_score, seed=seed)
        timer = StageTimer(listener=_decode_and_write_stages(on_stage))

        inputs = self.encode_inputs(prompt, settings, first_image, prompt_embeds=prompt_embeds,
                                    condition_latents=condition_latents, timer=timer)
        latents = self.denoise_inputs(inputs, settings, latents=latents, generator=generator, callback=callback,
                               progress=progress, timer=timer)
        if self.rank != 0 or output_type == "latent":
            timer.finish()
            video = latents if self.rank == 0 else None
            result = StepVideoPipelineOutput(video=video, latents=latents, path=None, timings=timer.as_dict())
            return result if return_dict else (video,)

        out_cfg = output or OutputConfig(save_path=self.save_path, name_suffix=self.name_suffix)
        path = None
        if output_type == "mp4":
            path = output_video_path(out_cfg.save_path, prompt or "video", seed=settings.seed,
                                     output_file_name=output_file_name or out_cfg.output_file_name,
                                     name_suffix=out_cfg.name_suffix, output_path=output_path or out_cfg.output_path)
            frames = self.write_video(latents, path, out_cfg, prompt=prompt or "", sampling=settings, timer=timer)
        else:
            timer.begin("decoding")
            frames = decoded_to_frames(self.decode(latents), crop_540p=out_cfg.crop_540p)
        timer.finish()
        result = StepVideoPipelineOutput(video=frames, latents=latents, path=path, timings=timer.as_dict())
        return result if return_dict else (frames,)

    def _call_settings(self, sampling: Optional[SamplingConfig], **arguments) -> SamplingConfig:
        """``__call__``'s arguments over ``sampling`` (or the reference defaults), sizes rounded."""
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        values = {name: _pick(value, name, sampling) for name, value in arguments.items()}
        if values["num_frames"] is None:
            values["num_frames"] = PIPELINE_CALL_TI2V_FRAMES if self.is_ti2v else PIPELINE_CALL_DEFAULTS.num_frames
        values["height"], values["width"], values["num_frames"] = self.check_inputs(
            values["height"], values["width"], values["num_frames"])
        return replace(sampling or PIPELINE_CALL_DEFAULTS, **values)


def _decode_and_write_stages(on_stage: Optional[Callable[[str], None]]):
    """A :class:`StageTimer` listener calling ``on_stage(name)`` as decoding and writing start."""
    if on_stage is None:
        return None
    seen = []

    def listener(stage: str, done: int, total: int) -> None:
        if stage in ("decoding", "writing") and stage not in seen:
            seen.append(stage)
            on_stage(stage)

    return listener


def encode_image(vae, image: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    """Encode the prepared first image ``[1, 1, 3, H, W]`` with a VAE component (local or remote)
    -> latents ``[1, 1, C, H/16, W/16]``.

    The image is cast to bf16 first, as the reference server does before encoding. The
    reference samples the posterior (unseeded); with ``seed`` the sample is reproducible and the
    same for local and remote VAEs.
    """
    return vae.encode(image.to(torch.bfloat16), seed=seed)
